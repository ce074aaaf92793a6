"""Logprobs, penalties and logit_bias over HTTP on a real server: OpenAI's shapes (the official client parses them),
streamed chunks that reassemble to the whole response, and the same values with the draft as without it."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from test_server_support import FIXED_DRAFTS, HELLO, TEST_KEY, client, start, tiny_app

from tandem.engine.llama import Model
from tandem.server.serving import ServerThread


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)


def post(server, path: str, **body) -> dict:
    with client(server) as c:
        r = c.post(path, json={"temperature": 0, **FIXED_DRAFTS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(server, **kw) -> dict:
    return post(server, "/v1/chat/completions", messages=HELLO, **kw)


def test_chat_logprobs_in_openai_shape(oai):
    r = oai.chat.completions.create(model=oai.models.list().data[0].id, messages=HELLO,
                                    max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob <= 0.0  # greedy: the most likely token
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
    plain = oai.chat.completions.create(model=r.model, messages=HELLO, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked for: null, as OpenAI
    only = oai.chat.completions.create(model=r.model, messages=HELLO, max_tokens=4, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[]] * 4


def test_logprobs_with_the_draft_equal_those_without(server):
    spec = chat(server, max_tokens=24, logprobs=True, top_logprobs=2)
    plain = chat(server, max_tokens=24, logprobs=True, top_logprobs=2, draft_model="none")
    assert spec["stats"]["accepted_draft_tokens_count"] > 0 and plain["stats"]["draft_model"] is None
    a, b = spec["choices"][0]["logprobs"]["content"], plain["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in a] == [e["token"] for e in b]
    assert [e["logprob"] for e in a] == pytest.approx([e["logprob"] for e in b], abs=1e-5)
    assert [[t["token"] for t in e["top_logprobs"]] for e in a] == [[t["token"] for t in e["top_logprobs"]] for e in b]


def test_streamed_chat_logprobs_reassemble_to_the_whole(oai):
    model = oai.models.list().data[0].id
    kw = dict(model=model, messages=HELLO, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    for c in chunks:  # each chunk carries the logprobs of its own tokens
        if c.choices and c.choices[0].delta.content:
            text = bytes(b for e in c.choices[0].logprobs.content for b in e.bytes)
            assert text.decode(errors="replace") == c.choices[0].delta.content


def test_completions_logprobs_legacy_shape_streamed_too(oai):
    model = oai.models.list().data[0].id
    kw = dict(model=model, prompt="Once upon a time", max_tokens=16, temperature=0, logprobs=2)
    whole = oai.completions.create(**kw)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 16
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(16)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == value and top[token] == value
    chunks = list(oai.completions.create(**kw, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset
    assert sum((p.token_logprobs for p in parts), []) == lp.token_logprobs


def test_penalties_apply_and_keep_the_draft_lossless(server):
    base = chat(server, max_tokens=32)["choices"][0]["message"]["content"]
    for field in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"repeat_penalty": 1.8}):
        spec = chat(server, max_tokens=32, **field)
        plain = chat(server, max_tokens=32, draft_model="none", **field)
        text = spec["choices"][0]["message"]["content"]
        assert text == plain["choices"][0]["message"]["content"], field
        assert text != base, field
        assert spec["stats"]["accepted_draft_tokens_count"] > 0, field


def test_logit_bias_bans_and_forces_tokens(oai, tiny):
    model = oai.models.list().data[0].id
    vocab = Model(tiny["main"])
    kw = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=0)
    plain = oai.completions.create(**kw).choices[0].logprobs.tokens
    banned = next(i for i in range(vocab.n_vocab) if vocab.piece(i).decode(errors="replace") == plain[0])
    out = oai.completions.create(**kw, logit_bias={str(banned): -100}).choices[0].logprobs.tokens
    assert plain[0] not in out and out != plain
    forced = 1000
    kw.update(temperature=0.8, seed=1)
    out = oai.completions.create(**kw, logit_bias={str(forced): 100}).choices[0].logprobs
    assert out.tokens == [vocab.piece(forced).decode(errors="replace")] * 8
    assert out.token_logprobs == pytest.approx([0.0] * 8, abs=1e-4)  # the bias is in the reported distribution
    chat = oai.chat.completions.create(model=model, messages=HELLO, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == vocab.piece(forced).decode(errors="replace") * 3
