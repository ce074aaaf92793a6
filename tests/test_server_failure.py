"""Loud failure: a draft that cannot be used stops `tandem serve` (non-zero, cause and fix on stderr) and gets a
request its own status (422 incompatible, 507 does not fit, 500 llama.cpp cannot load it); only
--draft-optional falls back to plain decoding, and then says so in /health and in every response's stats."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server_support import HELLO, RUNTIME_SPEC, TEST_KEY, assert_openai_error, client, spec_options

from tandem.config import SERVE_PARALLEL, ModelOptions
from tandem.models.fit import MIB, plan_for
from tandem.models.gguf_header import read_header
from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.serving import ServerThread

CHAT = "/v1/chat/completions"
SERVE = [sys.executable, "-c", "import sys; from tandem.cli import main; sys.exit(main())", "serve"]


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory) -> dict[str, Path]:
    """Unusable drafts: not GGUF, and a GGUF whose header reads fine but that llama.cpp refuses (a tensor renamed)."""
    d = tmp_path_factory.mktemp("broken")
    (d / "notes.gguf").write_text("not a model at all\n")
    data = bytearray(tiny["draft_small"].read_bytes())
    at = data.index(b"output_norm.weight")
    data[at:at + 18] = b"output_norm.weighX"
    (d / "unloadable.gguf").write_bytes(bytes(data))
    read_header(d / "unloadable.gguf")  # the plan accepts it: only llama.cpp can tell
    return {"not_gguf": d / "notes.gguf", "unloadable": d / "unloadable.gguf", "missing": d / "missing.gguf"}


def _limit_for(tiny, draft: str, *, extra: int, parallel: int = 1) -> str:
    """A --memory-limit that holds the tiny main + `draft` at ctx 256 with `extra` bytes to spare."""
    o = ModelOptions(model=str(tiny["main"]), draft=str(tiny[draft]), ctx_size=256, threads=1, parallel=parallel)
    return str(plan_for(o, tiny["main"], tiny[draft]).total + extra)


# -- tandem serve ----------------------------------------------------------------------------------------------
def _serve_fails(tiny, draft: str, *extra: str) -> tuple[int, str, float]:
    cmd = [*SERVE, "--model", str(tiny["main"]), "--draft", draft, "--ctx-size", "256", "--threads", "1",
           "--port", "0", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr, time.monotonic() - t0


@pytest.mark.parametrize(("case", "cause", "fix", "code"), [
    ("missing", "does not exist", "check the path", 2),
    ("not_gguf", "is not a GGUF model", "convert it", 2),
    ("incompatible", "cannot be used with", "pick a draft whose tokenizer can write", 2),
    ("does_not_fit", "does not fit: draft", "--draft none", 3),
    ("unloadable", "llama.cpp could not load", "check that the file is complete", 1),
])
def test_serve_exits_non_zero_with_cause_and_fix(tiny, broken, case, cause, fix, code):
    extra: list[str] = []
    if case == "incompatible":
        draft = str(tiny["different_vocab"])
    elif case == "does_not_fit":
        draft = str(tiny["draft_close"])
        extra = ["--memory-limit", _limit_for(tiny, "draft_close", extra=-20 * MIB, parallel=SERVE_PARALLEL)]
    else:
        draft = str(broken[case])
    rc, err, seconds = _serve_fails(tiny, draft, *extra)
    assert rc == code, err
    assert seconds < 30
    line = next(ln for ln in err.splitlines() if ln.startswith("tandem serve: error:"))
    assert cause in line and fix in line, err


def test_serve_with_draft_optional_serves_degraded_and_says_why(tiny, broken):
    cmd = [*SERVE, "--model", str(tiny["main"]), "--draft", str(broken["unloadable"]), "--draft-optional",
           "--ctx-size", "256", "--threads", "1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith(("ready:", "NOT SERVING")):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        assert "DEGRADED" in lines[-1] and "llama.cpp could not load" in lines[-1]
        url = next(ln.split("serving on ")[1].split()[0] for ln in lines if "serving on" in ln)
        h = httpx.get(f"{url}/health")
        # no draft model: text lookups ("ngram"), which need none, are all that may draft
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["model"]["draft_model"] == "ngram"
        r = httpx.post(f"{url}{CHAT}", json={"messages": HELLO, "max_tokens": 3}, timeout=30)
        stats = r.json()["stats"]
        assert r.status_code == 200 and stats["draft_model"] == "ngram" and "model" not in stats["draft_tokens_by_source"]
        assert "llama.cpp could not load" in stats["draft_status"]
    finally:
        proc.terminate()
        proc.wait(20)


# -- the app: start-up with --draft-optional --------------------------------------------------------------------
def _app(opts: ModelOptions):
    return create_app(ServerOptions(api_key=TEST_KEY), lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None),
                      spec_options())


def _wait(srv: ServerThread) -> httpx.Response:
    deadline = time.monotonic() + 60
    while (h := httpx.get(f"{srv.url}/health")).json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return h


@pytest.mark.parametrize(("case", "reason"), [("incompatible", "cannot be used with"),
                                              ("does_not_fit", "does not fit: draft")])
def test_draft_optional_falls_back_and_every_response_says_why(tiny, case, reason):
    draft = "different_vocab" if case == "incompatible" else "draft_close"
    limit = _limit_for(tiny, "draft_close", extra=-20 * MIB) if case == "does_not_fit" else None
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny[draft]), ctx_size=256, threads=1,
                        memory_limit=limit, draft_optional=True)
    with ServerThread(_app(opts)) as srv:
        h = _wait(srv)
        assert h.status_code == 200 and h.json()["status"] == "degraded" and reason in h.json()["reason"]
        with client(srv) as c:
            for stream in (False, True):
                r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3, "stream": stream,
                                       "stream_options": {"include_usage": True}} if stream else
                           {"messages": HELLO, "max_tokens": 3})
                assert r.status_code == 200
                if stream:  # (no draft model: text lookups are all that may draft)
                    assert '"draft_model": "ngram"' in r.text.replace('"draft_model":"ngram"', '"draft_model": "ngram"')
                    assert reason in r.text
                else:
                    stats = r.json()["stats"]
                    assert stats["draft_model"] == "ngram" and reason in stats["draft_status"]
                    assert "model" not in stats["draft_tokens_by_source"]


def test_without_draft_optional_the_app_serves_nothing(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["different_vocab"]), ctx_size=256, threads=1)
    with ServerThread(_app(opts)) as srv:
        h = _wait(srv)
        assert h.status_code == 503 and h.json()["status"] == "failed"
        with client(srv) as c:
            r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3})
        assert assert_openai_error(r, 503)["code"] == "model_load_failed"


# -- a request's own draft_model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_close"]), ctx_size=256, threads=1)
    with ServerThread(_app(opts)) as srv:
        assert _wait(srv).json()["status"] == "ready"
        yield srv


@pytest.mark.parametrize(("draft", "status", "code", "words"), [
    ("different_vocab", 422, "incompatible_draft", "cannot be used with"),
    ("unloadable", 500, "load_failed", "llama.cpp could not load"),
    ("not_gguf", 400, None, "is not a GGUF model"),
])
def test_request_draft_that_cannot_be_used_is_refused(tiny, broken, roomy, draft, status, code, words):
    path = str(tiny[draft]) if draft in tiny else str(broken[draft])
    with client(roomy) as c:
        for stream in (False, True):
            r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3, "draft_model": path, "stream": stream})
            err = assert_openai_error(r, status)
            assert words in err["message"] and (code is None or err["code"] == code)
            assert err["param"] == "draft_model" or status != 422
        ok = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3})  # the server itself is fine
        assert ok.status_code == 200 and ok.json()["stats"]["draft_model"] == tiny["draft_close"].stem


def test_request_draft_that_does_not_fit_gets_507(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_close"]), ctx_size=256, threads=1,
                        memory_limit=_limit_for(tiny, "draft_close", extra=20 * MIB))
    with ServerThread(_app(opts)) as srv:
        assert _wait(srv).json()["status"] == "ready"
        with client(srv) as c:
            r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3, "draft_model": str(tiny["draft_small"])})
            err = assert_openai_error(r, 507)
            assert err["code"] == "insufficient_memory" and err["param"] == "draft_model"
            assert f"draft {tiny['draft_small'].stem} needs" in err["message"] and "free" in err["message"]
            ok = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["stats"]["draft_model"] == tiny["draft_close"].stem
