"""tandem serve --parallel N (tandem.server.batching): concurrent requests are decoded together, and each one's
text is what it gets alone, with the draft and without."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from test_server_support import (FIXED_DRAFTS, RUNTIME_SPEC, TEST_KEY, assert_identity, client, metrics,
                                 model_options, sample, spec_options, start, wait_ready)

from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app

REQUESTS = [("Hello, who are you?", 24), ("Write a poem about the sea.", 60), ("1 2 3 4", 12),
            ("Explain speculative decoding.", 40)]


@pytest.fixture(scope="module")
def server(tiny):
    opts = dataclasses.replace(model_options(tiny, ctx=4 * 512), parallel=4)
    srv = start(create_app(ServerOptions(api_key=TEST_KEY), lambda: Runtime(opts, spec=RUNTIME_SPEC,
                                                                             announce=lambda _s: None),
                           spec_options()))
    wait_ready(srv.url)
    yield srv
    srv.stop()


def _chat(server, text: str, max_tokens: int, **kw) -> dict:
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "temperature": 0,
                                                 "max_tokens": max_tokens, "cache_prompt": False, **FIXED_DRAFTS,
                                                 **kw})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("draft", [None, "none"], ids=["draft", "no-draft"])
def test_concurrent_requests_are_batched_and_each_gets_its_text_alone(server, draft):
    extra = {"draft_model": draft} if draft else {}
    alone = [_chat(server, text, n, **extra) for text, n in REQUESTS]
    before = metrics(server.url)
    together: list[dict | None] = [None] * len(REQUESTS)

    def send(i: int) -> None:
        together[i] = _chat(server, REQUESTS[i][0], REQUESTS[i][1], **extra)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together, strict=True):
        assert b is not None
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert_identity(b["stats"])
        assert (b["stats"]["total_draft_tokens_count"] > 0) == (draft is None)
    after = metrics(server.url)
    steps = sample(after, "tandem_step_sequences_count") - sample(before, "tandem_step_sequences_count")
    lone = (sample(after, "tandem_step_sequences_bucket", le="1.0")
            - sample(before, "tandem_step_sequences_bucket", le="1.0"))
    assert steps > lone  # some steps decoded two requests or more together
