"""`tandem models` as a user runs it: the listing, --why, set-draft, and per-model defaults in `tandem run`."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_registry import NAMES, link_models

from tandem.cli import main as tandem_main
from tandem.models import defaults


@pytest.fixture
def models(tiny, tmp_path, monkeypatch) -> Path:
    """The fixtures in the models folder; the index and derived-model cache in a fresh temp folder."""
    root = link_models(tiny, tmp_path / "models")
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(root))
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TANDEM_CONFIG", str(tmp_path / "config" / "models.toml"))
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = tandem_main(["models", *args])
    out, err = capsys.readouterr()
    return code, out, err


def settings_file() -> dict:
    import os
    return tomllib.loads(Path(os.environ["TANDEM_CONFIG"]).read_text())


def test_json_lists_every_model_with_facts_and_drafts(models, capsys):
    code, out, _ = run(capsys, "--json")
    assert code == 0
    data = json.loads(out)
    by_id = {m["id"]: m for m in data["models"]}
    assert set(by_id) == {*NAMES, defaults.draft_path().stem}
    m = by_id["main"]
    assert (m["arch"], m["quantization"], m["context_length"], m["origin"]) == ("llama", "F32", 2048, "models-dir")
    assert m["n_params"] > by_id["draft_small"]["n_params"] and m["size_bytes"] > 0
    assert m["compatible_drafts"] == ["main_f16", "draft_small"] and m["default_draft"] is None
    assert by_id[defaults.draft_path().stem]["origin"] == "builtin"
    assert data["models_dir"] == str(models)


def test_table_shows_the_columns(models, capsys):
    code, out, _ = run(capsys)
    assert code == 0
    for word in ("id", "arch", "quant", "params", "size", "ctx", "compatible", "default", "draft_small", "F16"):
        assert word in out


def test_why_gives_the_reason_for_each_refused_draft(models, capsys):
    code, out, _ = run(capsys, "--why", "main", "--json")
    assert code == 0
    drafts = {d["draft"]: d for d in json.loads(out)["drafts"]}
    assert drafts["draft_small"]["compatible"] and drafts["draft_small"]["reason"] is None
    assert "no shared text encoding" in drafts["different_vocab"]["reason"]
    assert "not smaller" in drafts["draft_same"]["reason"]
    code, out, _ = run(capsys, "--why", "main")
    assert code == 0 and "no shared text encoding" in out


def test_set_draft_writes_the_file_and_none_clears_it(models, capsys):
    code, out, _ = run(capsys, "set-draft", "main", "draft_small")
    assert code == 0 and "draft_small" in out
    assert settings_file() == {"models": {"main": {"draft": "draft_small"}}}
    code, out, _ = run(capsys, "--json")
    assert {m["id"]: m["default_draft"] for m in json.loads(out)["models"]}["main"] == "draft_small"
    code, out, _ = run(capsys, "set-draft", "main", "none")
    assert code == 0 and settings_file() == {}


@pytest.mark.parametrize("names, expect", [
    (["main", "different_vocab"], "no shared text encoding"),
    (["main", "draft_same"], "not smaller"),
    (["main", "nope"], "'nope' is not in the registry"),
    (["nope", "draft_small"], "'nope' is not in the registry"),
    (["main"], "set-draft takes a main model and a draft"),
])
def test_set_draft_refuses_bad_pairs_with_exit_2(models, capsys, names, expect):
    code, out, err = run(capsys, "set-draft", *names)
    assert code == 2 and out == ""
    assert expect in err and len(err.strip().splitlines()) == 1
    assert ": " in err.split("error: ", 1)[1]  # cause: fix
    assert not Path(__import__("os").environ["TANDEM_CONFIG"]).exists()


def test_a_broken_settings_file_exits_2(models, capsys):
    import os
    Path(os.environ["TANDEM_CONFIG"]).parent.mkdir(parents=True)
    Path(os.environ["TANDEM_CONFIG"]).write_text("[models.main]\ndraft = 3\n")
    code, _, err = run(capsys)
    assert code == 2 and "draft must be a string" in err


def test_empty_models_dir_says_where_to_put_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "--models-dir", str(tmp_path / "empty"), "--json")
    assert code == 0 and json.loads(out)["models_dir"] == str(tmp_path / "empty")


# -- per-model defaults in `tandem run` ---------------------------------------------------------------
def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=120)


RUN = ("run", "--prompt", "Once upon a time", "--max-tokens", "12", "--json", "--draft-policy", "fixed",
       "--no-pause-slow-draft")  # the tiny drafts cost as much as the tiny main: they would be paused


def test_run_uses_the_default_draft_and_an_explicit_draft_wins(models, capsys):
    assert run(capsys, "set-draft", "main", "draft_small")[0] == 0
    r = tandem(*RUN, "--model", "main")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["draft_model"] == "draft_small"
    r = tandem(*RUN, "--model", "main", "--draft", "none")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["draft_model"] is None
    r = tandem(*RUN, "--model", "main", "--draft", "main_f16")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["draft_model"] == "main_f16"


def test_run_applies_model_settings_unless_the_flag_is_given(models):
    import os
    cfg = Path(os.environ["TANDEM_CONFIG"])
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[models.main]\nctx_size = 256\ndraft = "none"\n')
    long_prompt = ("run", "--model", "main", "--prompt", "word " * 400, "--max-tokens", "2", "--json")
    r = tandem(*long_prompt)
    assert r.returncode == 2 and "context holds" in r.stderr
    r = tandem(*long_prompt, "--ctx-size", "2048")
    assert r.returncode == 0, r.stderr
    # no draft model (text lookups, which need none, may still draft: only --draft none turns them off)
    assert json.loads(r.stdout)["stats"]["draft_model"] in (None, "ngram")


def test_a_default_draft_that_is_gone_fails_loudly(models):
    import os
    cfg = Path(os.environ["TANDEM_CONFIG"])
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[models.main]\ndraft = "vanished"\n')
    r = tandem(*RUN, "--model", "main")
    assert r.returncode == 2
    assert "default draft 'vanished' of main" in r.stderr and "set-draft" in r.stderr
