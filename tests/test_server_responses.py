"""OpenAI's Responses API (POST /v1/responses) on a real server over the tiny models, through the official openai
client: whole and streamed answers, instructions, stored conversations, tool round trips, structured output,
errors, a dropped stream, and Codex CLI where it is installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import jsonschema
import openai
import pydantic
import pytest
from test_server_support import (FIXED_DRAFTS, TEST_KEY, assert_identity, assert_openai_error, client, metrics,
                                 sample, start, tiny_app)

from tandem.errors import LoadingError
from tandem.server.responses_api import ResponseNotFoundError, ResponseStore
from tandem.server.serving import ServerThread

OTHER_KEY = "other-key-456"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                          "required": ["city"]}}
GREEDY = {"temperature": 0, "extra_body": FIXED_DRAFTS}


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny, api_key=f"{TEST_KEY},{OTHER_KEY}"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)


def test_a_response_whole(oai, tiny):
    r = oai.responses.create(model=tiny["main"].stem, input="Hello, who are you?", max_output_tokens=20, **GREEDY)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == tiny["main"].stem
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "incomplete"
    assert [p.type for p in msg.content] == ["output_text"] and r.output_text == msg.content[0].text != ""
    assert r.usage.output_tokens == 20 and r.usage.total_tokens == r.usage.input_tokens + 20
    stats = r.model_extra["stats"]
    assert stats["generated_tokens"] == 20 and stats["draft_model"] == tiny["draft_close"].stem
    assert r.model_extra["timings"]["predicted_n"] == 20
    assert_identity(stats)
    plain = oai.responses.create(input="Hello, who are you?", max_output_tokens=20, temperature=0,
                                 extra_body={"draft_model": "none"}, metadata={"run": "1"}, user="u1",
                                 reasoning={"effort": "high"})  # Tandem's fields pass through; reasoning is a no-op
    assert plain.model_extra["stats"]["draft_model"] is None and plain.output_text == r.output_text
    assert plain.metadata == {"run": "1"} and plain.user == "u1" and plain.reasoning.effort is None


_TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done"]


def test_a_streamed_response_is_the_whole_one_in_openais_events(oai):
    for prompt in ("Hello, who are you?", "Write a poem about the sea."):
        kw = dict(input=prompt, instructions="Answer briefly.", max_output_tokens=40, **GREEDY)
        whole = oai.responses.create(**kw)
        events = list(oai.responses.create(**kw, stream=True))
        kinds = [e.type for e in events]
        assert [k for i, k in enumerate(kinds) if k != kinds[i - 1]] == [*_TEXT_EVENTS, "response.incomplete"], kinds
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == whole.output_text and text
        done = next(e for e in events if e.type == "response.output_text.done")
        final = events[-1].response
        assert done.text == text == final.output_text and final.id == events[0].response.id
        assert events[0].response.status == "in_progress" and events[0].response.output == []
        assert final.usage.output_tokens == whole.usage.output_tokens == 40
        item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
        assert item_ids == {final.output[0].id}
        assert_identity(final.model_extra["stats"])


def test_instructions_are_the_system_message(oai, server):
    """The prompt is the chat template's, with instructions as the system message: the same tokens and text as
    the chat completion with that system message."""
    r = oai.responses.create(input="Hi there", instructions="You are a pirate.", max_output_tokens=24, **GREEDY)
    with client(server) as c:
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "You are a pirate."},
                                                                 {"role": "user", "content": "Hi there"}],
                                                    "max_tokens": 24, "temperature": 0, **FIXED_DRAFTS}).json()
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert r.output_text == chat["choices"][0]["message"]["content"]
    bare = oai.responses.create(input="Hi there", max_output_tokens=1, **GREEDY)
    assert bare.usage.input_tokens != r.usage.input_tokens


def test_previous_response_id_continues_the_conversation(oai):
    """The second request's prompt is the first's input, its output and the new input: the same prompt as sending
    the whole conversation, and its start comes from the prompt cache."""
    first = oai.responses.create(input="Name a colour.", instructions="Be brief.", max_output_tokens=12, **GREEDY)
    second = oai.responses.create(input="And another?", previous_response_id=first.id, instructions="Be brief.",
                                  max_output_tokens=12, **GREEDY)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    explicit = oai.responses.create(input=[{"role": "user", "content": "Name a colour."},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "And another?"}],
                                    instructions="Be brief.", max_output_tokens=12, **GREEDY)
    assert explicit.usage.input_tokens == second.usage.input_tokens and explicit.output_text == second.output_text
    third = oai.responses.create(input="One more.", previous_response_id=second.id, max_output_tokens=4, **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens  # chains go back to the first input


def test_stored_responses_are_kept_per_key_unless_store_false(oai, server):
    kept = oai.responses.create(input="Hello", max_output_tokens=4, **GREEDY)
    assert oai.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    other = openai.OpenAI(base_url=f"{server.url}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(kept.id)  # another key's response is not found
    unkept = oai.responses.create(input="Hello", max_output_tokens=4, store=False, **GREEDY)
    assert unkept.store is False
    with client(server) as c:
        err = assert_openai_error(c.post("/v1/responses", json={"input": "More", "previous_response_id": unkept.id}),
                                  404, "previous_response_id")
        assert err["code"] == "previous_response_not_found" and unkept.id in err["message"]
        assert_openai_error(c.get(f"/v1/responses/{unkept.id}"), 404)
        assert c.delete(f"/v1/responses/{kept.id}").json() == {"id": kept.id, "object": "response.deleted",
                                                               "deleted": True}
        assert_openai_error(c.get(f"/v1/responses/{kept.id}"), 404)


def test_the_store_is_bounded_least_recently_used_first():
    """Past its count (or its bytes) the store drops the response used longest ago; a read counts as a use."""
    store = ResponseStore(max_count=2, max_bytes=1 << 20)
    for name in ("a", "b"):
        store.put("", {"id": name, "output": []}, [])
    store.get("", "a")  # a is now the most recently used
    store.put("", {"id": "c", "output": []}, [])
    assert store.get("", "a") and store.get("", "c")
    with pytest.raises(ResponseNotFoundError):
        store.get("", "b")
    with pytest.raises(ResponseNotFoundError):
        store.get("key1", "a")  # another key's scope
    small = ResponseStore(max_count=100, max_bytes=200)
    for name in ("a", "b", "c"):
        small.put("", {"id": name, "output": [], "pad": "x" * 60}, [])
    with pytest.raises(ResponseNotFoundError):
        small.get("", "a")
    assert small.get("", "c")


def test_a_function_call_round_trip(oai):
    """tool_choice required: one function_call item whose arguments validate against the tool's schema; its output
    sent back (previous_response_id) gets a message, from a prompt holding the call and its result."""
    call_kw = dict(input="Weather in Paris?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                   max_output_tokens=120, **GREEDY)
    r = oai.responses.create(**call_kw)
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events = list(oai.responses.create(**call_kw, stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta",
                                        "response.function_call_arguments.done", "response.output_item.done",
                                        "response.completed"]
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    assert events[4].arguments == call.arguments and events[-1].response.output[0].arguments == call.arguments
    answer = oai.responses.create(input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
                                  previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8, **GREEDY)
    assert [o.type for o in answer.output] == ["message"] and answer.output_text
    explicit = oai.responses.create(input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER], max_output_tokens=8, **GREEDY)
    assert explicit.usage.input_tokens == answer.usage.input_tokens and explicit.output_text == answer.output_text
    named = oai.responses.create(**{**call_kw, "tool_choice": {"type": "function", "name": "get_weather"}})
    assert [o.type for o in named.output] == ["function_call"]


class Colour(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    hex: str = pydantic.Field(pattern="^#[0-9a-f]{6}$")
    warm: bool


def test_json_schema_output_parses(oai):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}}}
    r = oai.responses.create(input="Some JSON please", max_output_tokens=80, **GREEDY, text={
        "format": {"type": "json_schema", "name": "pair", "schema": schema, "strict": True}})
    assert r.status == "completed"
    out = json.loads(r.output_text)
    jsonschema.validate(out, {**schema, "required": ["a", "b"], "additionalProperties": False})  # strict closed it
    parsed = oai.responses.parse(input="A colour", text_format=Colour, max_output_tokens=120, **GREEDY)
    assert isinstance(parsed.output_parsed, Colour)
    obj = oai.responses.create(input="Ann is 31.", max_output_tokens=80, text={"format": {"type": "json_object"}},
                               **GREEDY)  # the prompt of test_server_structured's json_object test: it closes
    assert isinstance(json.loads(obj.output_text), dict)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "hi", "tools": [{**WEATHER, "parameters": {"type": "string"}}]}, "tools[0].parameters"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": "0"}, "temperature"),
    ({"input": "hi", "background": True}, None),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "strict": True,
                                         "schema": {"type": "object", "additionalProperties": True}}}}, "text.format"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "tool_choice"),
])
def test_bad_input_is_a_400_in_openais_shape(server, body, param):
    with client(server) as c:
        err = assert_openai_error(c.post("/v1/responses", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_unknown_model_and_missing_key(oai, server):
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model="no-such-model", input="hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    for key in (None, "wrong-key"):
        with client(server, key=key) as c:
            assert_openai_error(c.post("/v1/responses", json={"input": "hi"}), 401)
            assert_openai_error(c.get("/v1/responses/resp_x"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).responses.create(input="hi")


def test_a_dropped_stream_stops_the_generation(server):
    """Without cancellation the 2000-token generation would hold the engine for seconds."""
    before = metrics(server.url)
    u = urlsplit(server.url)
    body = json.dumps({"input": "Hello", "max_output_tokens": 2000, "temperature": 0, "stream": True,
                       "draft_model": "none"}).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"response.output_text.delta") < 6:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    sock.close()
    t0 = time.perf_counter()
    with client(server) as c:
        r = c.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 5})
    assert r.status_code == 200 and time.perf_counter() - t0 < 2.0
    after = metrics(server.url)
    assert sample(after, "tandem_generations_total", stop_reason="cancelled") \
        - sample(before, "tandem_generations_total", stop_reason="cancelled") == 1
    generated = sample(after, "tandem_generated_tokens_total") - sample(before, "tandem_generated_tokens_total")
    assert generated < 1500, "the dropped generation ran on"
    assert sample(after, "tandem_requests_total", endpoint="/v1/responses", status="200") >= 2


def test_an_error_mid_stream_is_an_error_event_then_response_failed(tiny):
    """The engine ends a running stream (here the shutdown's grace period running out): OpenAI's `error` event,
    then `response.failed` carrying the error, and no response.completed."""
    srv = start(tiny_app(tiny, draft=None))
    try:
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
        stream = oai.responses.create(input="Hello", max_output_tokens=2000, stream=True)
        events = [next(stream)]
        assert events[0].type == "response.created"
        srv.app.state.engine.abort(LoadingError("the server is shutting down and this request did not finish "
                                                "within its --shutdown-timeout", "retry against a running server",
                                                code="shutting_down"))
        events += list(stream)
        error, failed = events[-2:]
        assert error.type == "error" and error.code == "shutting_down" and "shutting down" in error.message
        assert failed.type == "response.failed" and failed.response.status == "failed"
        assert failed.response.error.code == "shutting_down" and failed.response.id == events[0].response.id
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "response.completed" not in {e.type for e in events}
    finally:
        srv.stop()


# -- Codex CLI ---------------------------------------------------------------------------------------------------
CODEX = os.environ.get("TANDEM_CODEX") or shutil.which("codex")
"""Codex CLI (`npm install @openai/codex`): $TANDEM_CODEX, else `codex` on PATH."""


@pytest.mark.skipif(CODEX is None, reason="Codex CLI not installed (npm install -g @openai/codex, or set "
                                          "TANDEM_CODEX to its path)")
def test_codex_cli_runs_a_turn_against_tandem(tiny, tmp_path):
    """`codex exec` with Tandem as its model provider (wire_api "responses"), other hosts unreachable: its request
    (developer messages, namespace tools, reasoning, store false) is served and its stream read to the end. The tiny
    model writes random text until it samples its end token (the turn completes) or fills the context (an incomplete
    response, which Codex reports as such): either way Codex read our events, and counts the prompt as we did."""
    srv = start(tiny_app(tiny, draft=None, ctx=10240))  # Codex's prompt (instructions, tool schemas): ~9,100 tokens
    try:
        home = tmp_path / "codex-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'model = "{tiny["main"].stem}"\nmodel_provider = "tandem"\nweb_search = "disabled"\n\n'
            f'[model_providers.tandem]\nname = "Tandem"\nbase_url = "{srv.url}/v1"\nwire_api = "responses"\n'
            'env_key = "TANDEM_API_KEY"\nrequest_max_retries = 0\nstream_max_retries = 0\n')
        blackhole = "http://127.0.0.1:9"
        env = {**os.environ, "CODEX_HOME": str(home), "TANDEM_API_KEY": TEST_KEY, "HTTPS_PROXY": blackhole,
               "HTTP_PROXY": blackhole, "ALL_PROXY": blackhole, "NO_PROXY": "127.0.0.1,localhost"}
        run = subprocess.run([CODEX, "exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only",
                              "Say hi."], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                             stdin=subprocess.DEVNULL)
        events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        kinds = [e["type"] for e in events]
        assert "turn.started" in kinds, (run.stdout, run.stderr)
        if "turn.completed" in kinds:
            assert run.returncode == 0, run.stderr
            usage = next(e for e in events if e["type"] == "turn.completed")["usage"]
            scrape = metrics(srv.url)
            assert usage["input_tokens"] == sample(scrape, "tandem_prompt_tokens_total") > 8000, usage
            assert any(e["type"] == "item.completed" and e["item"]["type"] == "agent_message" for e in events)
        else:  # the context filled first: Codex read response.incomplete
            failed = [e for e in events if e["type"] in ("turn.failed", "error")]
            assert failed and all("max_output_tokens" in json.dumps(e) for e in failed), (run.stdout, run.stderr)
        with client(srv) as c:
            assert sample(metrics(srv.url), "tandem_requests_total", endpoint="/v1/responses", status="200") >= 1
            assert c.get("/health").json()["status"] == "ready"
    finally:
        srv.stop()
