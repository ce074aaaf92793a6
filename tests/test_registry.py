"""The model registry on the tiny fixtures: header facts without loading weights, the on-disk index,
ids, the built-ins, and which model can draft for which (the same incompatibility() Runtime uses)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from gguf import GGUFReader

from tandem.engine.llama import Model
from tandem.engine.vocab import vocab_info_from_metadata
from tandem.errors import IncompatibleDraftError, ModelNotFoundError, NotGGUFError
from tandem.models import defaults
from tandem.models.gguf_meta import SkippedArray, read_header
from tandem.models.registry import BUILTIN, MODELS_DIR, Registry, RegistryConfig

NAMES = ("main", "draft_same", "draft_close", "draft_small", "different_vocab", "main_f16")


def link_models(tiny: dict[str, Path], root: Path, names=NAMES) -> Path:
    """A models folder with the fixtures under friendly names (symlinks: no copying)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.gguf").symlink_to(tiny[name])
    return root


def scan(models: Path, index: Path, *, builtin: bool = False, extra=()) -> Registry:
    return Registry.scan(RegistryConfig(models_dir=models, index_dir=index, builtin=builtin, extra=tuple(extra)))


@pytest.fixture
def reg(tiny, tmp_path) -> Registry:
    return scan(link_models(tiny, tmp_path / "models"), tmp_path / "index")


# -- header -------------------------------------------------------------------------------------------
def test_header_matches_gguf_reader(tiny):
    path = tiny["draft_small"]
    ours = read_header(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    ref = GGUFReader(path)
    assert set(ours.kv) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        mine = ours.kv[key]
        if isinstance(mine, SkippedArray):
            assert mine.count == len(f.data), key
        else:
            assert mine == f.contents(), key
    assert [(t.name, t.type, t.n_elements) for t in ours.tensors] == \
        [(t.name, int(t.tensor_type), int(t.n_elements)) for t in ref.tensors]
    assert sum(t.n_bytes for t in ours.tensors) == sum(int(t.n_bytes) for t in ref.tensors)


@pytest.mark.parametrize("name", ["main", "different_vocab", "main_f16"])
def test_vocab_from_metadata_equals_loaded_model(tiny, name):
    meta = vocab_info_from_metadata(read_header(tiny[name]).kv)
    loaded = Model(tiny[name]).vocab_info()
    assert meta == loaded  # every field, token texts included
    assert meta.fingerprint == loaded.fingerprint


def test_vocab_from_metadata_equals_loaded_default_draft():
    path = defaults.draft_path()
    assert vocab_info_from_metadata(read_header(path).kv) == Model(path).vocab_info()


def test_not_gguf_and_truncated_files_are_typed_errors(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(NotGGUFError, match="no GGUF header"):
        read_header(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny["main"].read_bytes()[:4096])
    with pytest.raises(NotGGUFError, match="truncated"):
        read_header(cut)
    with pytest.raises(ModelNotFoundError):
        read_header(tmp_path / "missing.gguf")


# -- scanning -----------------------------------------------------------------------------------------
def test_facts_match_the_loaded_model(reg, tiny):
    assert sorted(e.id for e in reg) == sorted(NAMES)
    for name in ("main", "draft_small", "main_f16"):
        e = reg.find(name)
        m = Model(tiny[name])
        assert e.origin == MODELS_DIR
        assert e.facts.arch == "llama"
        assert e.facts.n_params == m.n_params
        assert e.size_bytes == tiny[name].stat().st_size
        assert e.facts.context_length == 2048
        assert e.facts.n_vocab == m.n_vocab
        assert e.facts.vocab_fingerprint == m.vocab_info().fingerprint
    assert reg.find("main").facts.quantization == "F32"
    assert reg.find("main_f16").facts.quantization == "F16"
    assert reg.find("draft_small").facts.n_params < reg.find("main").facts.n_params


def test_second_scan_reads_the_index_and_a_touched_file_is_parsed_again(tiny, tmp_path):
    models = link_models(tiny, tmp_path / "models", names=("main", "draft_small"))
    shutil.copy(tiny["draft_close"], models / "copy.gguf")
    first = scan(models, tmp_path / "index")
    assert first.parsed == 3
    again = scan(models, tmp_path / "index")
    assert again.parsed == 0
    assert [e.to_dict() for e in again] == [e.to_dict() for e in first]
    st = (models / "copy.gguf").stat()
    os.utime(models / "copy.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert scan(models, tmp_path / "index").parsed == 1
    (models / "copy.gguf").unlink()
    after = scan(models, tmp_path / "index")
    assert after.parsed == 0 and after.get("copy") is None


def test_compatibility_survives_a_restart_without_parsing(tiny, tmp_path):
    models = link_models(tiny, tmp_path / "models")
    scan(models, tmp_path / "index")
    reg = scan(models, tmp_path / "index")
    assert [d.id for d in reg.compatible_drafts(reg.find("main"))] == ["main_f16", "draft_small"]
    assert reg.parsed == 0  # vocabularies came from the store


def test_a_rescan_keeps_the_loaded_vocabularies_of_the_models_still_listed(tiny, tmp_path):
    """A rescan (every request naming an unknown model or draft makes one) does not load each vocabulary again
    to list the compatible drafts."""
    models = link_models(tiny, tmp_path / "models", names=("main", "draft_small", "different_vocab"))
    config = RegistryConfig(models_dir=models, index_dir=tmp_path / "index", builtin=False)
    first = Registry.scan(config)
    drafts = [d.id for d in first.compatible_drafts(first.find("main"))]
    (models / "different_vocab.gguf").unlink()
    again = Registry.scan(config, previous=first)
    main = again.find("main")
    assert again.vocab(main) is first.vocab(first.find("main"))
    assert [d.id for d in again.compatible_drafts(main)] == drafts == ["draft_small"]
    gone = first.find("different_vocab").facts.vocab_fingerprint
    assert gone not in again._vocabs  # noqa: SLF001 - what a rescan keeps is the point of this test


def test_broken_files_are_reported_not_listed(tiny, tmp_path):
    models = link_models(tiny, tmp_path / "models", names=("main",))
    (models / "notes.gguf").write_text("not a model")
    (models / "readme.txt").write_text("ignored: not .gguf")
    reg = scan(models, tmp_path / "index")
    assert [e.id for e in reg] == ["main"]
    assert list(reg.broken) == [str(models / "notes.gguf")]
    assert "not a GGUF model" in reg.broken[str(models / "notes.gguf")]
    assert scan(models, tmp_path / "index").parsed == 0  # the failure is cached too


def test_repeated_stems_get_distinct_ids(tiny, tmp_path):
    models = tmp_path / "models"
    for sub in ("a", "b"):
        (models / sub).mkdir(parents=True)
        (models / sub / "same.gguf").symlink_to(tiny["main" if sub == "a" else "draft_small"])
    (models / "other.gguf").symlink_to(tiny["main_f16"])
    reg = scan(models, tmp_path / "index")
    assert sorted(e.id for e in reg) == ["b/same", "other", "same"]
    assert reg.find("same").path == models / "a" / "same.gguf"
    assert reg.find("b/same").facts.n_params < reg.find("same").facts.n_params  # b/ holds draft_small
    assert reg.get(str(models / "b" / "same.gguf")) is reg.find("b/same")


def test_lookup_by_id_file_name_and_path(reg, tiny):
    e = reg.find("main")
    assert reg.get("main.gguf") is e and reg.get(str(e.path)) is e and reg.get(str(tiny["main"])) is e
    with pytest.raises(ModelNotFoundError, match="not in the registry"):
        reg.find("nope")


def test_models_dir_confinement(reg, tiny, tmp_path):
    assert reg.in_models_dir(reg.find("main").path)
    assert not reg.in_models_dir(tmp_path / "elsewhere.gguf")
    assert not reg.in_models_dir(reg.config.models_dir / ".." / "index" / "index.json")


def test_builtins_are_listed_and_the_main_only_once_derived(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    reg = scan(tmp_path / "no-such-dir", tmp_path / "index", builtin=True)
    assert [(e.id, e.origin, e.facts.quantization) for e in reg] == [
        (defaults.draft_path().stem, BUILTIN, "Q4_1")]
    main = defaults.main_path()
    main.parent.mkdir(parents=True)
    shutil.copy(tiny["main"], main)  # stands in for the derived main: scans never derive
    reg = scan(tmp_path / "no-such-dir", tmp_path / "index", builtin=True)
    assert [e.id for e in reg] == [defaults.draft_path().stem, main.stem]


def test_extra_paths_are_listed_once(tiny, tmp_path):
    models = link_models(tiny, tmp_path / "models", names=("main",))
    reg = scan(models, tmp_path / "index", extra=[tiny["draft_small"], models / "main.gguf"])
    assert [(e.id, e.origin) for e in reg] == [("main", MODELS_DIR), (tiny["draft_small"].stem, "path")]


# -- compatibility ------------------------------------------------------------------------------------
def test_compatible_drafts_and_refusal_reasons(reg):
    main = reg.find("main")
    assert [d.id for d in reg.compatible_drafts(main)] == ["main_f16", "draft_small"]
    reasons = {p.draft: p.reason for p in reg.pairings(main)}
    assert reasons["draft_small"] is None and reasons["main_f16"] is None
    assert "no shared text encoding" in reasons["different_vocab"]
    assert "not smaller" in reasons["draft_same"] and "not smaller" in reasons["draft_close"]
    assert "main" not in reasons
    # "smaller" is by file size or by parameters: F16 main has fewer bytes, the 1-layer draft fewer parameters
    assert [d.id for d in reg.compatible_drafts(reg.find("draft_small"))] == ["main_f16"]
    assert [d.id for d in reg.compatible_drafts(reg.find("main_f16"))] == ["draft_small"]
    assert "not smaller" in {p.draft: p.reason for p in reg.pairings(reg.find("main_f16"))}["main"]


def test_check_pair_raises_the_typed_error(reg):
    main = reg.find("main")
    reg.check_pair(main, reg.find("draft_small"))
    with pytest.raises(IncompatibleDraftError, match="no shared text encoding") as e:
        reg.check_pair(main, reg.find("different_vocab"))
    assert e.value.exit_code == 2 and "tandem models" in e.value.fix
    with pytest.raises(IncompatibleDraftError, match="not smaller"):
        reg.check_pair(main, reg.find("draft_same"))
