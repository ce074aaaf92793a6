"""Anthropic's Messages API on a real server through the official `anthropic` SDK: the same engine path as chat
completions (same text, same prompt), streaming, tool calls and their results, count_tokens, Anthropic's error
bodies, and a dropped stream freeing the engine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest
from starlette.requests import Request
from test_server_support import HELLO, TEST_KEY, assert_identity, assert_openai_error, client, metrics, sample, start, \
    tiny_app

from tandem.errors import LoadingError
from tandem.server.messages_api import anthropic_key_index
from tandem.server.serving import ServerThread

TIME = {"name": "get_time", "description": "The time in a zone", "input_schema": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}
DATE = {"name": "get_date", "input_schema": {
    "type": "object", "properties": {"day": {"type": "integer", "enum": [1, 2]}}, "required": ["day"]}}
T0 = {"temperature": 0}
"""Greedy decoding (the SDK has no temperature argument any more; clients such as Claude Code still send it)."""
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"],
                                                  **({"description": t["description"]} if "description" in t else {})}}
                for t in (DATE, TIME)]


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(tiny) -> str:
    return tiny["main"].stem


def openai_chat(server, **body) -> dict:
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_anthropic_error(r: httpx.Response, status: int, kind: str, *words: str) -> str:
    """The response is Anthropic's error body with this status and type; its message names cause and fix (and
    holds `words`)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    message = body["error"]["message"]
    assert ": " in message and len(message) > 20, message
    for w in words:
        assert w in message, (w, message)
    return message


def test_a_message_is_the_chat_completion_of_the_same_conversation(claude, server, model_id):
    """Same engine path: the text, the prompt's length and the speculation stats of a chat completion."""
    r = claude.messages.create(model=model_id, max_tokens=20, system="You are terse.", messages=HELLO,
                               metadata={"user_id": "u1"}, extra_body={**T0, "not_a_field": 1},
                               extra_headers={"anthropic-version": "2023-06-01"})
    chat = openai_chat(server, messages=[{"role": "system", "content": "You are terse."}, *HELLO], max_tokens=20)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == model_id
    assert [b.type for b in r.content] == ["text"]
    assert r.content[0].text == chat["choices"][0]["message"]["content"] != ""
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert r.usage.output_tokens == 20
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    stats = r.model_extra["stats"]
    assert stats["generated_tokens"] == 20 and stats["total_draft_tokens_count"] > 0 and stats["draft_model"]
    assert_identity(stats)
    blocks = claude.messages.create(model=model_id, max_tokens=20, extra_body=T0, messages=HELLO,
                                    system=[{"type": "text", "text": "You are terse.", "cache_control": {
                                        "type": "ephemeral"}}])
    assert blocks.content[0].text == r.content[0].text


def test_the_stream_joins_to_the_whole_message(claude, server, model_id):
    kw = dict(model=model_id, max_tokens=24, extra_body=T0, messages=HELLO)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        deltas = list(s.text_stream)
        final = s.get_final_message()
    assert len([d for d in deltas if d]) > 1, "the text comes in pieces"
    assert "".join(deltas) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        claude.messages.count_tokens(model=model_id, messages=HELLO).input_tokens
    # the wire: each event's name is its data's type, in Anthropic's order, the stats on message_delta
    raw = {"model": model_id, "max_tokens": 24, "messages": HELLO, **T0, "stream": True}
    with client(server) as c, c.stream("POST", "/v1/messages", json=raw) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for chunk in text.strip().split("\n\n"):
        name, data = chunk.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}", chunk
        events.append(payload)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["stats"]["generated_tokens"] == 24
    assert_identity(events[-2]["stats"])


def test_stop_sequences_say_which_one_matched(claude, model_id):
    """With several stop sequences only the raw output tells which one ended the text (the text stops before it)."""
    base = claude.messages.create(model=model_id, max_tokens=30, extra_body=T0, messages=HELLO).content[0].text
    stop = base[12:15]
    kw = dict(model=model_id, max_tokens=30, extra_body=T0, messages=HELLO)
    for stops in ([stop], ["\x00never", stop, "\x01never"]):
        r = claude.messages.create(**kw, stop_sequences=stops)
        assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop), r
        assert r.content[0].text == base[:base.find(stop)]
        with claude.messages.stream(**kw, stop_sequences=stops) as s:
            final = s.get_final_message()
        assert (final.stop_reason, final.stop_sequence, final.content[0].text) == \
            ("stop_sequence", stop, r.content[0].text)


def test_output_config_format_holds_the_answer_to_the_schema(claude, model_id):
    """The tiny model writes random tokens: only the schema's grammar makes its answer this JSON."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = claude.messages.create(model=model_id, max_tokens=60, extra_body=T0, messages=HELLO,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert r.stop_reason == "end_turn", r
    assert json.loads(r.content[0].text)["answer"] in ("yes", "no")


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_time"}])
def test_a_forced_tool_use_parses_and_its_result_goes_back(claude, server, model_id, choice):
    """tool_choice any/tool: the call grammar makes the tiny model's random tokens a valid call; its tool_use block
    comes back parsed, streamed alike; the tool_result sent back reaches the model as the chat route's tool message
    (the answer is the chat completion's for the same history)."""
    ask = [{"role": "user", "content": "Time?"}]
    kw = dict(model=model_id, max_tokens=120, extra_body=T0, tools=[DATE, TIME], tool_choice=choice)
    r = claude.messages.create(messages=ask, **kw)
    assert r.stop_reason == "tool_use", r
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_")
    if choice["type"] == "tool":
        assert use.name == "get_time" and use.input["zone"] in ("UTC", "CET")
    else:
        assert (use.name, set(use.input)) in (("get_time", {"zone"}), ("get_date", {"day"}))
        assert use.input.get("zone", "UTC") in ("UTC", "CET") and use.input.get("day", 1) in (1, 2)
    with claude.messages.stream(messages=ask, **kw) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [(b.name, b.input) for b in final.content if b.type == "tool_use"] \
        == [(use.name, use.input)]

    history = [*ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12:00"}]}]
    answer = claude.messages.create(model=model_id, max_tokens=12, extra_body=T0, tools=[DATE, TIME],
                                    messages=history)
    assert answer.role == "assistant" and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    chat = openai_chat(server, max_tokens=12, tools=OPENAI_TOOLS, messages=[
        *ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "12:00"}])
    text = "".join(b.text for b in answer.content if b.type == "text")
    assert text == (chat["choices"][0]["message"]["content"] or "")
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]


def test_count_tokens_is_the_prompt_the_model_gets(claude, server, model_id):
    """The model's template and tokenizer, the tools' prompt included: what a generation's usage counts."""
    kw = dict(model=model_id, system="Be brief.", messages=[{"role": "user", "content": "Time in Paris?"}])
    plain = claude.messages.count_tokens(**kw).input_tokens
    with_tools = claude.messages.count_tokens(**kw, tools=[TIME]).input_tokens
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time in Paris?"}]
    assert plain == openai_chat(server, messages=msgs, max_tokens=1)["usage"]["prompt_tokens"]
    assert with_tools == openai_chat(server, messages=msgs, max_tokens=1, tools=OPENAI_TOOLS[1:])["usage"][
        "prompt_tokens"] > plain + 20
    with client(server) as c:
        r = c.post("/v1/messages/count_tokens", json={"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]})
    assert_anthropic_error(r, 400, "invalid_request_error", "messages[0].content[0]", "image")


def test_the_key_is_taken_from_either_header_and_refused_in_anthropics_shape(server, model_id):
    ok = dict(model=model_id, max_tokens=2, messages=HELLO)
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=TEST_KEY, max_retries=0, timeout=60)
    assert bearer.messages.create(**ok).usage.output_tokens == 2
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(**ok)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    assert "header is wrong" in e.value.body["error"]["message"]
    with httpx.Client(base_url=server.url, timeout=60) as c:  # x-api-key (older SDKs, Claude Code's API key)
        assert c.post("/v1/messages", json=ok, headers={"x-api-key": TEST_KEY}).json()["usage"]["output_tokens"] == 2
        assert_anthropic_error(c.post("/v1/messages", json=ok, headers={"x-api-key": "wrong"}), 401,
                               "authentication_error", "x-api-key header is wrong")
        assert_anthropic_error(c.post("/v1/messages", json=ok), 401, "authentication_error", "x-api-key")
        assert_anthropic_error(c.post("/v1/messages/count_tokens", json=ok, headers={"x-api-key": "no"}), 401,
                               "authentication_error")
        # the OpenAI routes keep OpenAI's error body
        assert_openai_error(c.post("/v1/chat/completions", json={"messages": HELLO}), 401)


def _key_of(headers: dict[str, str], key: str) -> int | None:
    scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return anthropic_key_index(Request(scope), key)


def test_each_key_is_one_client_whichever_header_carries_it():
    """The suffix cache's scope is per key: x-api-key and Bearer with the same key are the same client."""
    assert _key_of({"x-api-key": "b"}, "a,b") == 1 == _key_of({"Authorization": "Bearer b"}, "a,b")
    assert _key_of({"x-api-key": "a"}, "a,b") == 0
    assert _key_of({"x-api-key": "c", "Authorization": "Bearer a"}, "a,b") is None  # x-api-key decides


BAD = {
    "no max_tokens": ({"messages": HELLO}, "max_tokens is required"),
    "system role": ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    "image block": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {
        "type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]},
        "messages[0].content[1] is a image block"),
    "tool_result for no call": ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]}, "messages[0].content[0].tool_use_id"),
    "tool_use input not an object": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}, {"role": "user", "content": "y"}]},
        "messages[1].content[0].input"),
    "prefill": ({"messages": [*HELLO, {"role": "assistant", "content": "Sure"}]}, "messages[1]"),
    "server tool": ({"messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
                    "tools[0]"),
    "bad input_schema": ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
                         "tools[0].input_schema"),
    "tool_choice names no tool": ({"messages": HELLO, "tools": [TIME], "tool_choice": {"type": "tool", "name": "g"}},
                                  "tool_choice"),
    "temperature over 1": ({"messages": HELLO, "temperature": 1.5}, "temperature"),
    "output format not a schema": ({"messages": HELLO, "output_config": {"format": {"type": "xml"}}},
                                   "output_config.format"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_400_naming_the_field(server, model_id, case):
    body, words = BAD[case]
    body = {"max_tokens": 4, **body} if case != "no max_tokens" else body
    with client(server) as c:
        assert_anthropic_error(c.post("/v1/messages", json={"model": model_id, **body}), 400,
                               "invalid_request_error", words)


def test_the_sdk_raises_its_errors_for_bad_input_and_unknown_models(claude, model_id):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model_id, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=HELLO)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert model_id in e.value.body["error"]["message"]  # names the model to use


def test_thinking_blocks_in_the_history_are_left_out(claude, model_id):
    history = [*HELLO, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                         {"type": "text", "text": "Hi."}]},
               {"role": "user", "content": "And?"}]
    plain = [*HELLO, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And?"}]
    assert claude.messages.count_tokens(model=model_id, messages=history).input_tokens == \
        claude.messages.count_tokens(model=model_id, messages=plain).input_tokens


def _open_stream(server: ServerThread, max_tokens: int) -> socket.socket:
    """A streaming Messages request on a raw socket, read until a few text deltas have come."""
    u = urlsplit(server.url)
    body = json.dumps({"messages": HELLO, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "draft_model": "none"}).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"x-api-key: {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"event: content_block_delta") < 4:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    return sock


def test_a_dropped_stream_stops_its_generation(claude, server, model_id):
    """Without cancellation the 2000-token generation would hold the engine for seconds."""
    reference = claude.messages.create(model=model_id, max_tokens=30, extra_body=T0, messages=HELLO)
    before = metrics(server.url)
    _open_stream(server, max_tokens=2000).close()
    t0 = time.perf_counter()
    with claude.messages.stream(model=model_id, max_tokens=30, extra_body=T0, messages=HELLO) as s:
        first = next(iter(s.text_stream))
        started = time.perf_counter() - t0
        text = first + "".join(s.text_stream)
    assert started < 1.0, f"the next request's first text came {started:.2f} s after the disconnect"
    after = metrics(server.url)
    assert sample(after, "tandem_generations_total", stop_reason="cancelled") \
        - sample(before, "tandem_generations_total", stop_reason="cancelled") == 1
    generated = sample(after, "tandem_generated_tokens_total") - sample(before, "tandem_generated_tokens_total")
    assert generated - 30 < 1500, "the dropped generation ran on"
    assert text == reference.content[0].text
    assert sample(after, "tandem_requests_total", endpoint="/v1/messages", status="200") > 0


def test_an_error_mid_stream_is_an_error_event(tiny, model_id):
    """The engine ends a running stream (here the shutdown's grace period running out): the stream closes with
    Anthropic's `event: error`, whose body is the error's (no message_stop)."""
    srv = start(tiny_app(tiny, draft=None))
    try:
        body = {"model": model_id, "max_tokens": 2000, "messages": HELLO, **T0, "stream": True}
        with client(srv) as c, c.stream("POST", "/v1/messages", json=body) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: message_start"
            srv.app.state.engine.abort(LoadingError("the server is shutting down and this request did not finish "
                                                    "within its --shutdown-timeout", "retry against a running server",
                                                    code="shutting_down"))
            rest = list(lines)
        name, data = [line for line in rest if line][-2:]
        assert name == "event: error", rest[-6:]
        err = json.loads(data.removeprefix("data: "))
        assert err["type"] == "error" and err["error"]["type"] == "overloaded_error"
        assert "shutting down" in err["error"]["message"] and "message_stop" not in "".join(rest)
    finally:
        srv.stop()
