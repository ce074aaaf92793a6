"""The per-model defaults file: TOML in, TOML out, typed errors for what cannot be used."""

from __future__ import annotations

import re
import tomllib

import pytest

from tandem.errors import BadInputError
from tandem.models.settings import ModelSettings, SettingsFile, default_config_path


def test_missing_file_is_empty(tmp_path):
    s = SettingsFile.load(tmp_path / "nope.toml")
    assert s.models == {} and s.get("x") == ModelSettings()


def test_round_trip_through_tomllib(tmp_path):
    s = SettingsFile(tmp_path / "sub" / "models.toml")
    odd = 'we"ird\\ id \u00e9\u4e2d\x7f\t'
    s.update("main", draft="small", ctx_size=8192, draft_p_min=0.25, cache_type_k="q8_0")
    s.update(odd, draft_max=4)
    s.save()
    raw = tomllib.loads(s.path.read_text())
    assert raw == {"models": {"main": {"draft": "small", "ctx_size": 8192, "draft_p_min": 0.25, "cache_type_k": "q8_0"},
                              odd: {"draft_max": 4}}}
    again = SettingsFile.load(s.path)
    assert again.models == s.models
    assert again.get("main").values() == {"draft": "small", "ctx_size": 8192, "draft_p_min": 0.25,
                                          "cache_type_k": "q8_0"}


def test_clearing_the_last_field_drops_the_model(tmp_path):
    s = SettingsFile(tmp_path / "m.toml")
    s.update("main", draft="small")
    s.update("main", draft=None)
    assert s.models == {}
    s.save()
    assert tomllib.loads(s.path.read_text()) == {}


def test_an_integer_is_accepted_for_a_float(tmp_path):
    (tmp_path / "m.toml").write_text('[models.a]\ndraft_p_min = 1\n')
    assert SettingsFile.load(tmp_path / "m.toml").get("a").draft_p_min == 1.0


@pytest.mark.parametrize("text, expect", [
    ("[models.a\n", "cannot read"),
    ("draft = 'x'\n", "only [models"),
    ("[models.a]\ncolour = 'red'\n", "unknown key 'colour'"),
    ("[models.a]\nctx_size = '4096'\n", "ctx_size must be an integer"),
    ("[models.a]\nctx_size = true\n", "ctx_size must be an integer"),
    ("[models.a]\nctx_size = 0\n", "ctx_size is out of range"),
    ("[models.a]\ndraft_p_min = 1.5\n", "between 0 and 1"),
    ("[models.a]\ncache_type_k = 'q3'\n", "must be one of"),
    ("[models]\na = 3\n", "is not a table"),
])
def test_bad_files_are_typed_errors_naming_the_problem(tmp_path, text, expect):
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(BadInputError, match=re.escape(expect)) as e:
        SettingsFile.load(tmp_path / "m.toml")
    assert e.value.fix and e.value.exit_code == 2


def test_location_honours_env_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CONFIG", str(tmp_path / "x.toml"))
    assert default_config_path() == tmp_path / "x.toml"
    monkeypatch.delenv("TANDEM_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_config_path() == tmp_path / "cfg" / "tandem" / "models.toml"
