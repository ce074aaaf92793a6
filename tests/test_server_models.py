"""The server over the registry: listings, per-model default drafts, path confinement, and models loaded
just in time (while the loaded ones keep serving), with LRU eviction and idle TTL."""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_registry import link_models
from test_server_support import FIXED_DRAFTS, HELLO, TEST_KEY, client, spec_options, start

from tandem.config import ModelOptions, RegistryOptions
from tandem.models.library import Library
from tandem.models.settings import SettingsFile
from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.models import ModelDirectory, ModelSource
from tandem.server.serving import ServerThread

CHAT = "/v1/chat/completions"


@pytest.fixture
def models(tiny, tmp_path, monkeypatch) -> Path:
    root = link_models(tiny, tmp_path / "models")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    settings = SettingsFile(tmp_path / "models.toml")
    settings.update("main", draft="draft_small")
    settings.update("main_f16", draft="draft_small", draft_max=3)
    settings.save()
    return root


def make_app(models: Path, **server):
    lib = Library.open(RegistryOptions(models_dir=str(models), config=str(models.parent / "models.toml")))
    base = ModelOptions(model="main", ctx_size=512, threads=1)
    source = ModelSource(lib, base, spec_options(), frozenset({"model", "ctx_size", "threads"}))
    opts, spec = lib.resolve(base, source.spec, source.explicit)
    return create_app(ServerOptions(api_key=TEST_KEY, **server),
                      lambda: Runtime(opts, spec=spec, announce=lambda _s: None), spec, source=source)


@pytest.fixture
def server(models) -> Iterator[ServerThread]:
    srv = start(make_app(models))
    yield srv
    srv.stop()


def chat(srv: ServerThread, **kw) -> httpx.Response:
    with client(srv) as c:
        return c.post(CHAT, json={"messages": HELLO, "max_tokens": 6, "temperature": 0, **FIXED_DRAFTS, **kw})


def health(srv: ServerThread) -> dict:
    return httpx.get(f"{srv.url}/health").json()


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- listings -----------------------------------------------------------------------------------------
def test_v1_models_lists_every_registry_model_loaded_first(server):
    with client(server) as c:
        data = c.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "main" and {"draft_small", "draft_close", "main_f16", "different_vocab", "draft_same"} <= set(ids)
    main = data[0]
    assert main["state"] == "loaded" and main["n_ctx"] == 512
    assert main["draft_model"] == "draft_small" and main["speculative"] is True
    assert main["compatible_draft_models"] == ["main_f16", "draft_small"]
    assert main["default_draft_model"] == "draft_small"
    assert (main["arch"], main["quantization"], main["max_context_length"]) == ("llama", "F32", 2048)
    f16 = next(m for m in data if m["id"] == "main_f16")
    assert f16["state"] == "not-loaded" and f16["n_ctx"] is None


def test_lmstudio_listing(server):
    with client(server) as c:
        data = c.get("/api/v0/models").json()["data"]
        one = c.get("/api/v0/models/main_f16").json()
        missing = c.get("/api/v0/models/nope")
    by_id = {m["id"]: m for m in data}
    m = by_id["main"]
    assert m["type"] == "llm" and m["state"] == "loaded" and m["arch"] == "llama" and m["quantization"] == "F32"
    assert m["max_context_length"] == 2048 and m["compatible_draft_models"] == ["main_f16", "draft_small"]
    assert m["loaded_context_length"] == 512 and m["draft_model"] == "draft_small"
    assert one["state"] == "not-loaded" and one["compatible_draft_models"] == ["draft_small"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_listings_need_the_api_key(server):
    assert httpx.get(f"{server.url}/api/v0/models").status_code == 401


def test_a_new_file_is_listed_without_a_restart(server, models, tiny):
    shutil.copy(tiny["draft_small"], models / "late.gguf")  # a copy: links to a listed file are listed once
    with client(server) as c:
        assert "late" in [m["id"] for m in c.get("/v1/models").json()["data"]]


# -- drafts and confinement ---------------------------------------------------------------------------
def test_a_request_without_draft_model_uses_the_default_draft(server):
    r = chat(server)
    assert r.status_code == 200, r.text
    assert r.json()["stats"]["draft_model"] == "draft_small" and r.json()["model"] == "main"
    r = chat(server, draft_model="none")
    assert r.json()["stats"]["draft_model"] is None


def test_a_registry_draft_by_id_or_path_inside_the_folder(server, models):
    for name in ("main_f16", str(models / "main_f16.gguf")):
        r = chat(server, draft_model=name)
        assert r.status_code == 200, r.text
        assert r.json()["stats"]["draft_model"] == "main_f16"


@pytest.mark.parametrize("field, value, status, code", [
    ("model", "/etc/passwd", 403, "path_not_allowed"),
    ("model", "tiny-outside", 404, "model_not_found"),
    ("draft_model", "different_vocab", 422, "incompatible_draft"),
    ("draft_model", "draft_same", 422, "incompatible_draft"),
    ("draft_model", "no-such-draft", 404, "model_not_found"),
])
def test_bad_names_get_typed_errors(server, field, value, status, code):
    r = chat(server, **{field: value})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == field and ": " in err["message"]


def test_paths_outside_the_models_folder_are_refused(server, models, tiny):
    for field, path in (("model", str(tiny["main"])), ("draft_model", str(tiny["draft_small"])),
                        ("model", str(models / ".." / "models.toml")), ("draft_model", "~/x.gguf")):
        r = chat(server, **{field: path})
        assert r.status_code == 403, (field, path, r.text)
        assert "outside the models folder" in r.json()["error"]["message"]
        assert "GET /v1/models" in r.json()["error"]["message"]


# -- just-in-time loading -----------------------------------------------------------------------------
def test_a_second_model_loads_while_the_first_keeps_serving(models, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    real = ModelDirectory.load

    def gated(self, model_id, progress=None):
        started.set()
        assert gate.wait(60)
        return real(self, model_id, progress)

    monkeypatch.setattr(ModelDirectory, "load", gated)
    srv = start(make_app(models, max_loaded_models=2))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, srv, model="main_f16")
            assert started.wait(30)
            wait_for(lambda: health(srv).get("loading_models") == ["main_f16"], what="loading_models")
            for _ in range(3):  # the loaded model keeps serving while main_f16 loads
                r = chat(srv)
                assert r.status_code == 200 and r.json()["model"] == "main"
            assert not pending.done()
            gate.set()
            r = pending.result(60)
        assert r.status_code == 200, r.text
        # loaded with its own defaults: its default draft, and draft_max 3 for its requests
        assert r.json()["model"] == "main_f16" and r.json()["stats"]["draft_model"] == "draft_small"
        assert 0 < len(r.json()["stats"]["acceptance_by_position"]) <= 3
        assert sorted(health(srv)["loaded_models"]) == ["main", "main_f16"]
        with client(srv) as c:
            states = {m["id"]: m["state"] for m in c.get("/api/v0/models").json()["data"]}
        assert states["main"] == states["main_f16"] == "loaded" and states["draft_small"] == "not-loaded"
    finally:
        gate.set()
        srv.stop()


def test_least_recently_used_model_is_unloaded(models):
    srv = start(make_app(models, max_loaded_models=1))
    try:
        assert chat(srv, model="main_f16").status_code == 200
        assert health(srv)["loaded_models"] == ["main_f16"]
        r = chat(srv)  # the startup model comes back (through its own factory: same draft as configured)
        assert r.status_code == 200 and r.json()["stats"]["draft_model"] == "draft_small"
        assert health(srv)["loaded_models"] == ["main"]
        assert health(srv)["model"]["id"] == "main"
    finally:
        srv.stop()


def test_idle_models_and_drafts_are_unloaded_after_the_ttl(models, caplog):
    caplog.set_level(logging.INFO, logger="tandem.server")
    srv = start(make_app(models, max_loaded_models=3, ttl=0.5))
    try:
        assert chat(srv, model="main_f16").status_code == 200
        assert chat(srv, draft_model="main_f16").status_code == 200  # an on-demand draft for main
        wait_for(lambda: health(srv)["loaded_models"] == [], timeout=30, what="TTL unload")
        messages = [r.getMessage() for r in caplog.records]
        assert any("unloading main_f16: idle" in m for m in messages)
        assert any("unloading main: idle" in m for m in messages)
        r = chat(srv)  # and a request brings the model back
        assert r.status_code == 200 and r.json()["stats"]["draft_model"] == "draft_small"
    finally:
        srv.stop()


def test_loading_a_draft_never_reloads_its_main(models, caplog):
    caplog.set_level(logging.INFO, logger="tandem.server")
    srv = start(make_app(models, ttl=0.5))
    try:
        assert chat(srv).status_code == 200
        r = chat(srv, draft_model="main_f16")
        assert r.status_code == 200 and r.json()["stats"]["draft_model"] == "main_f16"
        deadline = time.monotonic() + 30
        while not any("on-demand draft of main" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the idle draft was not unloaded"
            assert chat(srv).status_code == 200  # main stays busy (and loaded) while its draft idles
            time.sleep(0.1)
        assert health(srv)["loaded_models"] == ["main"]
        messages = [r.getMessage() for r in caplog.records]
        assert any("loaded draft" in m and "main_f16" in m for m in messages)
        assert not any(m.startswith("loaded main ") or m.startswith("loading main ") for m in messages)
    finally:
        srv.stop()
