"""The OpenAI-compatible API on a real server: the official client, losslessness, stats, metrics, the queue."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import openai
import pytest
from test_server_support import FIXED_DRAFTS, HELLO, TEST_KEY, assert_identity, client, metrics, sample, start, tiny_app

from tandem.server.serving import ServerThread

PROMPTS = ["Hello, who are you?", "Write a poem about the sea.", "1 2 3 4", "Explain speculative decoding."]


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(oai) -> str:
    return oai.models.list().data[0].id


def chat(server, content: str, **kw) -> dict:
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                 "temperature": 0, **FIXED_DRAFTS, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_list(oai, tiny):
    models = oai.models.list().data
    assert [m.id for m in models] == [tiny["main"].stem]
    assert models[0].model_extra["draft_model"] == tiny["draft_close"].stem
    assert models[0].model_extra["speculative"] is True


def test_openai_chat_non_streamed(oai, model_id):
    r = oai.chat.completions.create(model=model_id, messages=HELLO, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    stats, timings = r.model_extra["stats"], r.model_extra["timings"]
    assert stats["generated_tokens"] == 20 and stats["stop_reason"] == "length"
    assert timings["predicted_n"] == 20 and timings["draft_n"] == stats["total_draft_tokens_count"]
    assert_identity(stats)


def test_openai_chat_streamed_equals_non_streamed(oai, model_id):
    for content in PROMPTS:
        msgs = [{"role": "user", "content": content}]
        whole = oai.chat.completions.create(model=model_id, messages=msgs, max_tokens=40, temperature=0)
        chunks = list(oai.chat.completions.create(model=model_id, messages=msgs, max_tokens=40, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason]
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
        assert_identity(last.model_extra["stats"])
        assert last.model_extra["timings"]["predicted_n"] == whole.usage.completion_tokens


def test_openai_completions(oai, model_id):
    whole = oai.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 24 and whole.choices[0].finish_reason == "length"
    streamed = list(oai.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].model_extra["stats"]["generated_tokens"] == 24
    assert_identity(whole.model_extra["stats"])


def test_completions_default_max_tokens_is_16(oai, model_id):
    r = oai.completions.create(model=model_id, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens == 16


def test_model_may_be_omitted_or_a_path(server, tiny):
    with client(server) as c:
        for model in (None, tiny["main"].stem, str(tiny["main"]), tiny["main"].name):
            body = {"messages": HELLO, "max_tokens": 3, **({"model": model} if model else {})}
            assert c.post("/v1/chat/completions", json=body).status_code == 200, model


def test_draft_output_equals_no_draft(server):
    """Lossless: the greedy text with the partially-agreeing draft is the main model's own text."""
    drafted_total = accepted_total = rejected_total = 0
    for content in PROMPTS:
        spec = chat(server, content, max_tokens=64)
        plain = chat(server, content, max_tokens=64, draft_model="none")
        assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert spec["stats"]["draft_model"] is not None and plain["stats"]["draft_model"] is None
        assert plain["stats"]["total_draft_tokens_count"] == 0
        assert_identity(spec["stats"])
        drafted_total += spec["stats"]["total_draft_tokens_count"]
        accepted_total += spec["stats"]["accepted_draft_tokens_count"]
        rejected_total += spec["stats"]["rejected_draft_tokens_count"]
    assert accepted_total > 0 and rejected_total > 0, "draft_close should agree only partly"


def test_token_sources_concatenate_to_content(server):
    r = chat(server, PROMPTS[1], max_tokens=48, return_token_sources=True)
    choice = r["choices"][0]
    sources = choice["token_sources"]
    assert "".join(s["text"] for s in sources) == choice["message"]["content"]
    assert {s["source"] for s in sources} == {"draft", "main"}
    n_draft = sum(1 for s in sources if s["source"] == "draft")
    assert 0 < n_draft <= r["stats"]["accepted_draft_tokens_count"]  # one entry per accepted draft token with text
    assert "token_sources" not in chat(server, PROMPTS[1], max_tokens=4)["choices"][0]


def test_token_sources_in_stream_chunks(server):
    with client(server) as c, c.stream("POST", "/v1/completions", json={
            "prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0, "stream": True,
            "return_token_sources": True, **FIXED_DRAFTS}) as r:
        chunks = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: {")]
    seen_draft = False
    for chunk in map(json.loads, chunks):
        choice = chunk["choices"][0]
        assert "".join(s["text"] for s in choice["token_sources"]) == choice["text"]
        seen_draft |= any(s["source"] == "draft" for s in choice["token_sources"])
    assert seen_draft


def test_stop_string_and_identity(server):
    base = chat(server, PROMPTS[0], max_tokens=30)["choices"][0]["message"]["content"]
    stop = base[10:14]
    r = chat(server, PROMPTS[0], max_tokens=30, stop=[stop, "never-seen"])
    text = r["choices"][0]["message"]["content"]
    assert text == base[:base.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop" and r["stats"]["stop_reason"] == "stop"
    assert_identity(r["stats"])


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 9])
def test_identity_when_max_tokens_cuts_drafts(server, max_tokens):
    r = chat(server, PROMPTS[2], max_tokens=max_tokens)
    assert r["usage"]["completion_tokens"] == max_tokens
    assert_identity(r["stats"])


def test_per_request_draft_knobs(server):
    off = chat(server, PROMPTS[1], max_tokens=20, draft_max=0)["stats"]
    assert off["total_draft_tokens_count"] == 0 and off["plain_steps"] > 0
    two = chat(server, PROMPTS[1], max_tokens=30, draft_max=2)["stats"]
    assert 0 < len(two["acceptance_by_position"]) <= 2
    confident = chat(server, PROMPTS[1], max_tokens=20, draft_p_min=1.0)["stats"]
    assert "model" not in confident["draft_tokens_by_source"]  # the draft model is never that sure (text lookups
    # of earlier requests have no confidence to cut at: they may draft)
    wide = chat(server, PROMPTS[1], max_tokens=30, draft_max=6, draft_min=6)["stats"]
    assert wide["total_draft_tokens_count"] % 6 == 0 and wide["total_draft_tokens_count"] > 0


def test_draft_model_by_name_and_by_path(server, tiny):
    plain = chat(server, PROMPTS[0], max_tokens=24, draft_model="none")["choices"][0]["message"]["content"]
    by_name = chat(server, PROMPTS[0], max_tokens=24, draft_model=tiny["draft_close"].stem)
    assert by_name["stats"]["draft_model"] == tiny["draft_close"].stem
    other = chat(server, PROMPTS[0], max_tokens=24, draft_model=str(tiny["draft_small"]))
    assert other["stats"]["draft_model"] == tiny["draft_small"].stem
    assert other["choices"][0]["message"]["content"] == plain == by_name["choices"][0]["message"]["content"]
    assert_identity(other["stats"])
    again = chat(server, PROMPTS[0], max_tokens=24)  # the configured draft is back for the next request
    assert again["stats"]["draft_model"] == tiny["draft_close"].stem


def test_a_draft_of_another_vocabulary_loads_per_request_and_drafts_through_text(server, tiny):
    """draft_model naming a GGUF of another tokenizer: loaded on demand, it drafts through text (the stats count its
    proposals in main ids) and the text stays the main model's."""
    plain = chat(server, PROMPTS[1], max_tokens=32, draft_model="none")["choices"][0]["message"]["content"]
    other = chat(server, PROMPTS[1], max_tokens=32, draft_model=str(tiny["other_vocab"]))
    assert other["stats"]["draft_model"] == tiny["other_vocab"].stem
    assert other["stats"]["total_draft_tokens_count"] > 0 and other["choices"][0]["message"]["content"] == plain
    assert_identity(other["stats"])


def test_metrics_move_by_the_request_counts(server):
    before = metrics(server.url)
    r = chat(server, PROMPTS[3], max_tokens=50)
    after = metrics(server.url)
    s = r["stats"]

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert s["total_draft_tokens_count"] > 0
    assert delta("tandem_spec_draft_tokens_total") == s["total_draft_tokens_count"]
    assert delta("tandem_spec_accepted_tokens_total") == s["accepted_draft_tokens_count"]
    assert delta("tandem_spec_rejected_tokens_total") == s["rejected_draft_tokens_count"]
    assert delta("tandem_spec_ignored_tokens_total") == s["ignored_draft_tokens_count"]
    assert delta("tandem_spec_drafts_total") == s["draft_steps"]
    assert delta("tandem_generated_tokens_total") == r["usage"]["completion_tokens"]
    assert delta("tandem_prompt_tokens_total") == r["usage"]["prompt_tokens"]
    per_pos = [delta("tandem_spec_accepted_tokens_per_pos_total", position=str(i)) for i in range(8)]
    assert sum(per_pos) >= s["accepted_draft_tokens_count"] and per_pos[0] > 0
    assert delta("tandem_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("tandem_time_to_first_token_seconds_count") == 1
    assert delta("tandem_request_duration_seconds_count", endpoint="/v1/chat/completions") == 1
    assert delta("tandem_generations_total", stop_reason="length") == 1


def test_concurrent_requests_are_queued_not_mixed(server):
    """Requests sent at once are served one at a time, each exactly as when sent alone."""
    alone = {p: chat(server, p, max_tokens=32)["choices"][0]["message"]["content"] for p in PROMPTS}
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        futures = {pool.submit(chat, server, p, max_tokens=32, stream=False): p for p in PROMPTS * 2}
        for fut, p in futures.items():
            assert fut.result()["choices"][0]["message"]["content"] == alone[p]


def test_seeded_sampling_is_reproducible(server):
    a = chat(server, PROMPTS[1], max_tokens=24, temperature=0.9, seed=7)
    b = chat(server, PROMPTS[1], max_tokens=24, temperature=0.9, seed=7)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert_identity(a["stats"])


@pytest.mark.skipif(not FIXED_DRAFTS, reason="this build has no draft policies")
def test_draft_policy_per_request_is_lossless(server):
    plain = chat(server, PROMPTS[2], max_tokens=40, draft_model="none")["choices"][0]["message"]["content"]
    for policy in ("fixed", "adaptive"):
        r = chat(server, PROMPTS[2], max_tokens=40, draft_policy=policy)
        assert r["choices"][0]["message"]["content"] == plain, policy
        assert_identity(r["stats"])


def test_a_chats_second_turn_reuses_the_first_and_answers_as_a_cold_start(oai, model_id, server):
    turn1 = [{"role": "system", "content": "You are a helpful assistant who answers briefly. " * 4},
             {"role": "user", "content": "Name a colour."}]
    first = oai.chat.completions.create(model=model_id, messages=turn1, max_tokens=12, temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And another one?"}]
    warm = oai.chat.completions.create(model=model_id, messages=turn2, max_tokens=12, temperature=0)
    cached = warm.usage.prompt_tokens_details.cached_tokens  # OpenAI's field, parsed by the official client
    assert first.usage.prompt_tokens <= cached < warm.usage.prompt_tokens
    assert warm.model_extra["stats"]["cached_tokens"] == warm.model_extra["timings"]["cache_n"] == cached
    cold = chat(server, "", messages=turn2, max_tokens=12, cache_prompt=False)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["message"]["content"] == warm.choices[0].message.content  # exact mode: bit for bit
    assert sample(metrics(server.url), "tandem_prefix_cache_hits_total") >= cached
