"""Helpers for the server tests (no tests here): a real uvicorn server on the tiny models, metric scraping."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tandem.config import ModelOptions, SpecOptions
from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.serving import ServerThread
from tandem.spec.generate import GenParams

TEST_KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def model_options(tiny: dict[str, Path], *, draft: str | None = "draft_close", ctx: int = 2048) -> ModelOptions:
    """Tiny main (+ draft) on one thread (steady timings even when other test runs share the CPU), decoded in
    exact mode (--exact): the random tiny models have near-tied logits everywhere, so only exact mode keeps
    speculative output equal to plain output, which the server tests check."""
    return ModelOptions(model=str(tiny["main"]), draft=str(tiny[draft]) if draft else "none", ctx_size=ctx,
                        threads=1, exact=True)


FIXED_DRAFTS: dict[str, str] = (
    {"draft_policy": "fixed"} if "draft_policy" in {f.name for f in dataclasses.fields(GenParams)} else {})
"""Request fields that pin draft lengths to draft_max where the build has an adaptive policy: on the tiny
models drafting costs as much as verifying, so an adaptive policy would rarely draft."""


def spec_options() -> SpecOptions:
    """Draft up to 8 tokens whatever the draft's confidence (fixed lengths where SpecOptions has a policy)."""
    fixed = FIXED_DRAFTS if "draft_policy" in {f.name for f in dataclasses.fields(SpecOptions)} else {}
    return SpecOptions(draft_max=8, draft_min=0, draft_p_min=0.0, pause_slow_draft=False, **fixed)


RUNTIME_SPEC = SpecOptions(pause_slow_draft=False)
"""The server tests' runtime options: the tiny draft is as large as the main model, so it can never pay and
would be paused by default; these tests are about what speculation does."""


def tiny_app(tiny: dict[str, Path], *, draft: str | None = "draft_close", ctx: int = 2048,
             api_key: str | None = TEST_KEY, max_body_bytes: int = 1 << 20, max_queue: int = 64,
             factory: Callable[[], Runtime] | None = None, suffix_cache: str = "shared") -> FastAPI:
    """`suffix_cache`: --suffix-cache (request: no text shared across requests)."""
    opts = model_options(tiny, draft=draft, ctx=ctx)
    runtime_spec = dataclasses.replace(RUNTIME_SPEC, suffix_cache=suffix_cache)
    return create_app(ServerOptions(api_key=api_key, max_body_bytes=max_body_bytes, max_queue=max_queue),
                      factory or (lambda: Runtime(opts, spec=runtime_spec, announce=lambda _s: None)),
                      dataclasses.replace(spec_options(), suffix_cache=suffix_cache))


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/health")
        if r.json()["status"] == "ready":
            return r.json()
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.02)
    raise AssertionError(f"{url} did not become ready")


def start(app: FastAPI) -> ServerThread:
    srv = ServerThread(app).start()
    wait_ready(srv.url)
    return srv


def client(srv: ServerThread, key: str | None = TEST_KEY, timeout: float = 60.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=srv.url, headers=headers, timeout=timeout)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_identity(stats: dict) -> None:
    """accepted + rejected + ignored == total, in the response's own stats."""
    assert stats["accepted_draft_tokens_count"] + stats["rejected_draft_tokens_count"] \
        + stats["ignored_draft_tokens_count"] == stats["total_draft_tokens_count"], stats


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is an OpenAI error body with the given status (and param, when given)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and len(err["message"]) > 20, err
    assert ": " in err["message"], f"no cause/fix in {err['message']!r}"
    if param is not None:
        assert err["param"] == param, err
    return err
