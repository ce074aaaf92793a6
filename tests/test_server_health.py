"""Start-up: /health says loading until the models are in, then ready (or failed, with the reason); `tandem serve`."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_server_support import (HELLO, RUNTIME_SPEC, TEST_KEY, assert_openai_error, metrics, model_options, sample,
                                 tiny_app, wait_ready)

from tandem.config import ModelOptions
from tandem.runtime import Runtime
from tandem.server.serving import ServerThread

CHAT = "/v1/chat/completions"


def test_health_is_loading_until_the_models_are_loaded(tiny):
    gate, loaded = threading.Event(), threading.Event()
    opts = model_options(tiny)

    def factory() -> Runtime:
        gate.wait(60)
        rt = Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None)
        loaded.set()
        return rt

    with ServerThread(tiny_app(tiny, factory=factory)) as srv:
        try:
            h = httpx.get(f"{srv.url}/health")
            assert h.status_code == 503 and h.json() == {"status": "loading"}
            r = httpx.post(f"{srv.url}{CHAT}", json={"messages": HELLO}, headers={"Authorization": f"Bearer {TEST_KEY}"})
            assert assert_openai_error(r, 503)["code"] == "model_loading"
            r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"})
            assert_openai_error(r, 503)
            assert sample(metrics(srv.url), "tandem_engine_ready") == 0
            gate.set()
            deadline = time.monotonic() + 60
            while (h := httpx.get(f"{srv.url}/health")).json()["status"] == "loading":
                assert time.monotonic() < deadline
            assert loaded.is_set(), "ready was reported before the Runtime finished loading"
            body = h.json()
            assert h.status_code == 200 and body["status"] == "ready" and body["speculative"] is True
            assert body["model"]["id"] == tiny["main"].stem
            assert body["model"]["draft_model"] == tiny["draft_close"].stem
            assert body["model"]["exact"] is True  # the probe found every verification batch size alike
            assert sample(metrics(srv.url), "tandem_engine_ready") == 1
            r = httpx.post(f"{srv.url}{CHAT}", json={"messages": HELLO, "max_tokens": 3},
                           headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        finally:
            gate.set()


@pytest.mark.parametrize("case", ["missing-model", "incompatible-draft"])
def test_failed_load_reports_failed_with_the_reason(tiny, case):
    if case == "missing-model":
        opts, expect = ModelOptions(model="/nonexistent/main.gguf", draft="none", threads=1), "/nonexistent/main.gguf"
    else:
        opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["different_vocab"]), threads=1, ctx_size=256)
        expect = "cannot be used with"
    with ServerThread(tiny_app(tiny, factory=lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None))) as srv:
        deadline = time.monotonic() + 60
        while (h := httpx.get(f"{srv.url}/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert expect in h.json()["reason"]
        r = httpx.post(f"{srv.url}{CHAT}", json={"messages": HELLO}, headers={"Authorization": f"Bearer {TEST_KEY}"})
        err = assert_openai_error(r, 503)
        assert expect in err["message"] and err["code"] == "model_load_failed"


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


@pytest.mark.parametrize("draft", ["draft_close", "none"])
def test_tandem_serve_cli(tiny, draft):
    """The real command: banner, background load, a request, one INFO line for it, clean exit on Ctrl-C."""
    draft_arg = str(tiny[draft]) if draft != "none" else "none"
    # --log-level after `serve` for one case, before it (the dispatcher's own flag) for the other.
    level = ["serve", "--log-level", "INFO"] if draft != "none" else ["--log-level", "INFO", "serve"]
    cmd = [sys.executable, "-c", "import sys; from tandem.cli import main; sys.exit(main())", *level,
           "--model", str(tiny["main"]), "--draft", draft_arg, "--ctx-size", "256", "--threads", "1",
           "--port", "0", "--api-key", TEST_KEY, "--no-pause-slow-draft"]  # the tiny draft cannot pay
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    try:
        banner: list[str] = []
        while not banner or not banner[-1].startswith(("ready:", "NOT SERVING")):
            banner.append(out.get(timeout=60))
        text = "".join(banner)
        url = re.search(r"serving on (http://\S+)", text).group(1)
        assert str(tiny["main"]) in text and "required" in text
        if draft == "none":
            assert "speculation off" in text and "no draft: speculation off" in banner[-1]
        else:
            assert str(tiny[draft]) in text and "speculation on" in text
            assert f"draft {tiny[draft].stem}: speculation on" in banner[-1]
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "temperature": 0},
                       headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        finally:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "INFO tandem.server: req-" in line]
    assert len(lines) == 1, err
    assert "4 tokens" in lines[0] and "tok/s" in lines[0]
    assert ("acceptance" in lines[0]) == (draft != "none")


def test_health_and_metrics_show_what_the_draft_policy_believes(tiny):
    """Per loaded pair: the long-run acceptance, the cost per row count and per draft length, and how many plain
    steps have passed since the drafter last drafted; updated as requests finish."""
    with ServerThread(tiny_app(tiny)) as srv:
        wait_ready(srv.url)
        auth = {"Authorization": f"Bearer {TEST_KEY}"}
        for _ in range(2):
            r = httpx.post(f"{srv.url}{CHAT}", json={"messages": HELLO, "max_tokens": 24}, headers=auth, timeout=60)
            assert r.status_code == 200
        stats = r.json()["stats"]
        policy = httpx.get(f"{srv.url}/health").json()["model"]["draft_policy"]
        snap = policy[tiny["draft_close"].stem]
        assert snap["verify_seconds"]["1"] > 0 and snap["draft_seconds"]["1"] > 0
        assert snap["draft_steps"] + snap["plain_steps"] >= stats["draft_steps"] + stats["plain_steps"]
        assert snap["draft_steps"] >= 1  # each request opens with a probe at least
        assert list(snap["acceptance"]) == ["sampled"]  # (the API's default temperature is 1)
        assert 0 <= snap["acceptance"]["sampled"] <= 1 and snap["acceptance_weight"]["sampled"] > 0
        scrape = metrics(srv.url)
        labels = {"model": str(tiny["main"]), "drafter": tiny["draft_close"].stem}
        assert sample(scrape, "tandem_spec_policy_acceptance", **labels, regime="sampled") == \
            pytest.approx(snap["acceptance"]["sampled"])
        assert sample(scrape, "tandem_spec_policy_verify_seconds", **labels, rows="1") > 0
        assert sample(scrape, "tandem_spec_policy_plain_steps_since_draft", **labels) == \
            snap["plain_steps_since_draft"]
