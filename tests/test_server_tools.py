"""Chat templates and tools over HTTP on a live server: /apply-template, /health's template, special tokens in text
completions, and tool requests and histories through the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from test_server_support import RUNTIME_SPEC, TEST_KEY, assert_openai_error, client, start, tiny_app

from tandem.config import ModelOptions
from tandem.engine.llama import Model
from tandem.runtime import Runtime, tokenize_prompt
from tandem.server.serving import ServerThread
from tandem.testing.tiny import QWEN_TOOLS, build_extra

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny, draft=None))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)


def _apply(server, **body) -> str:
    with client(server) as c:
        r = c.post("/apply-template", json=body)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"prompt"}
    return r.json()["prompt"]


def test_apply_template_shows_the_prompt_the_model_gets(server):
    prompt = _apply(server, messages=[{"role": "user", "content": "Hi"}])
    assert prompt == f"{SMOL_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_apply_template_with_tools_shows_the_generic_tool_prompt(server):
    prompt = _apply(server, messages=HISTORY, tools=[WEATHER])
    assert prompt.startswith("<|im_start|>system\nYou can call tools.")  # SmolLM2's template has no tool support
    assert '"name": "get_weather"' in prompt and '{"response": "<your answer>"}' in prompt
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]}' in prompt
    assert '<|im_start|>user\n{"tool_response": {"tool_call_id": "call_1", "content": "sunny, 21 C"}}' in prompt
    off = _apply(server, messages=HISTORY, tools=[WEATHER], tool_choice="none")
    assert "You can call tools." not in off and off.startswith(SMOL_SYSTEM)


def test_apply_template_needs_the_key_and_valid_messages(server):
    with client(server, key=None) as c:
        assert_openai_error(c.post("/apply-template", json={"messages": [{"role": "user", "content": "x"}]}), 401)
    with client(server) as c:
        assert_openai_error(c.post("/apply-template", json={"messages": []}), 400, "messages")


def test_health_names_the_template(server):
    with client(server) as c:
        model = c.get("/health").json()["model"]
    assert model["chat_template"] == {"name": "gguf", "origin": "gguf", "tool_format": "generic", "warning": None}
    assert "chat" not in model


def test_completions_parse_special_tokens_in_the_prompt(server, oai, tiny):
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    r = oai.completions.create(model=tiny["main"].stem, prompt=text, max_tokens=1, temperature=0)
    m = Model(tiny["main"])
    try:
        parsed, plain = tokenize_prompt(m, text), m.tokenize(text, parse_special=False)
    finally:
        m.close()
    assert r.usage.prompt_tokens == len(parsed) < len(plain)


def test_tools_request_end_to_end_with_the_openai_client(oai, tiny):
    kw = dict(model=tiny["main"].stem, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
              max_tokens=12, temperature=0)
    whole = oai.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.message.tool_calls:  # the tiny model writes random text; the shape holds either way
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert isinstance(choice.message.content, str)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (choice.message.content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]


def test_history_with_tool_calls_and_results_is_accepted(oai, tiny):
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}, "none"):
        r = oai.chat.completions.create(model=tiny["main"].stem, messages=HISTORY, tools=[WEATHER], tool_choice=choice,
                                        parallel_tool_calls=False, max_tokens=4, temperature=0)
        assert r.choices[0].message.role == "assistant"
        # without a grammar the tiny model's text comes back as text, with finish_reason stop/length
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
DATE = {"type": "function", "function": {"name": "get_date", "parameters": {
    "type": "object", "properties": {"day": {"type": "integer", "enum": [1, 2]}}, "required": ["day"]}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_required_or_named_tool_call_always_parses(oai, tiny, choice):
    """The tiny model writes random tokens: only the grammar makes its answer a valid call, streamed or whole (enum
    arguments, so that random tokens finish the call within max_tokens)."""
    kw = dict(model=tiny["main"].stem, messages=[{"role": "user", "content": "Time?"}], tools=[DATE, TIME],
              tool_choice=choice, parallel_tool_calls=False, max_tokens=120, temperature=0)
    r = oai.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_time" and args["zone"] in ("UTC", "CET")
    else:
        assert call.function.name in ("get_date", "get_time")
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    with client_for(oai) as c:  # with response_format too: refused, naming the conflict
        bad = c.post("/v1/chat/completions", json={**kw, "tools": [DATE, TIME],
                                                   "response_format": {"type": "json_object"}})
    assert_openai_error(bad, 400, "tool_choice")


def client_for(oai: openai.OpenAI):
    import httpx
    return httpx.Client(base_url=str(oai.base_url).removesuffix("/v1/").removesuffix("/v1"),
                        headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=60)


def test_a_tool_with_a_bad_schema_is_refused_naming_the_field(server):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": HISTORY, "tools": [WEATHER, bad]})
    err = assert_openai_error(r, 400, "tools[1].function.parameters")
    assert "not an object JSON schema" in err["message"]


@pytest.fixture(scope="module")
def gemma_server(tiny) -> Iterator[ServerThread]:
    opts = ModelOptions(model=str(tiny["gemma3"]), draft="none", ctx_size=512, threads=1)
    srv = start(tiny_app(tiny, factory=lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None)))
    yield srv
    srv.stop()


def test_a_fallback_template_is_reported_in_health_and_used(gemma_server):
    with client(gemma_server) as c:
        tpl = c.get("/health").json()["model"]["chat_template"]
        prompt = c.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert tpl["name"] == "gemma" and tpl["origin"] == "architecture"
    assert "no chat template in its GGUF" in tpl["warning"] and "gemma3" in tpl["warning"]
    assert prompt.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["usage"]["completion_tokens"] == 2


# -- required calls: parsed, in the model's own format, and bounded ------------------------------------------
def _required(oai, model: str, **kw):
    body = dict(model=model, messages=[{"role": "user", "content": "Time?"}], tools=[TIME], tool_choice="required",
                max_tokens=400, temperature=0, **kw)
    whole = oai.chat.completions.create(**body)
    chunks = list(oai.chat.completions.create(**body, stream=True))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    streamed = {d.index: d.function.arguments for d in deltas if d.function.arguments}
    calls = whole.choices[0].message.tool_calls
    assert [streamed[i] for i in sorted(streamed)] == [c.function.arguments for c in calls]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    return whole


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_call_comes_back_parsed_and_repeats_cannot_fill_the_budget(oai, tiny, parallel):
    """A model that wants one call after another (the tiny model with "," pushed up, as SmolLM2 does by itself): the
    calls are parsed, and a repeated call ends the answer (2 distinct calls of an enum argument at most, then one
    repeat) long before max_tokens. Before: content '{"tool_calls": [...' cut, finish_reason stop, no tool_calls."""
    r = _required(oai, tiny["main"].stem, parallel_tool_calls=parallel, logit_bias={"28": 100})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    args = [json.loads(c.function.arguments) for c in choice.message.tool_calls]
    assert all(c.function.name == "get_time" for c in choice.message.tool_calls)
    assert len(args) == 1 if not parallel else 1 <= len(args) <= 2
    assert len({a["zone"] for a in args}) == len(args)  # no call twice
    assert r.usage.completion_tokens < 80 < 400  # three calls at most, about 20 tokens each


@pytest.fixture(scope="module")
def qwen_server(tiny) -> Iterator[ServerThread]:
    opts = ModelOptions(model=str(build_extra(tiny["main"].parent, QWEN_TOOLS)), draft="none", ctx_size=1024, threads=1)
    srv = start(tiny_app(tiny, factory=lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None)))
    yield srv
    srv.stop()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_required_call_in_qwens_format_is_generated_and_parsed(qwen_server, choice):
    """Qwen2.5's template and <tool_call> token (tiny model): the call is written with the model's own special
    tokens and comes back in tool_calls (before: content "<tool_call>", finish_reason stop)."""
    with client(qwen_server) as c:
        assert c.get("/health").json()["model"]["chat_template"]["tool_format"] == "hermes"
    oai = openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Time?"}],
                                    tools=[DATE, TIME], tool_choice=choice, parallel_tool_calls=False,
                                    max_tokens=120, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None, r.choices[0]
    (call,) = msg.tool_calls
    assert call.function.name in (("get_time",) if isinstance(choice, dict) else ("get_time", "get_date"))
    assert isinstance(json.loads(call.function.arguments), dict)
    r = _required(oai, model)  # parallel calls: bounded, no repeats, streamed alike
    assert 1 <= len(r.choices[0].message.tool_calls) <= 2 and r.usage.completion_tokens < 80


def _call_schema(name: str) -> dict:
    """A JSON schema whose only answer is the call {"name": name, "arguments": {"zone": "CET"}}: it makes the tiny
    model answer as Qwen2.5-Coder answers under tool_choice auto, a bare JSON call instead of <tool_call> tags."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"], "properties": {
        "name": {"const": name}, "arguments": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                               "properties": {"zone": {"enum": ["CET"]}}}}}


@pytest.mark.parametrize("name", ["get_time", "get_stock"])
def test_a_json_answer_naming_a_declared_tool_is_a_call_in_every_api(qwen_server, name):
    """Qwen's template (hermes) under tool_choice auto: an answer that is only {"name", "arguments"} naming a declared
    tool comes back as a call, whole and streamed, from chat completions, the Messages API and the Responses API
    (before: the JSON as content, finish_reason stop); naming no declared tool (get_stock), it stays text."""
    import anthropic
    oai = openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    schema = _call_schema(name)
    kw = dict(model=model, messages=[{"role": "user", "content": "Time?"}], tools=[DATE, TIME], tool_choice="auto",
              max_tokens=60, temperature=0, response_format={"type": "json_schema", "json_schema": {
                  "name": "call", "schema": schema}})
    r = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_args = "".join(t.function.arguments or "" for c in chunks if c.choices
                            for t in c.choices[0].delta.tool_calls or [])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    claude = anthropic.Anthropic(base_url=qwen_server.url, api_key=TEST_KEY, max_retries=0, timeout=60)
    msg = claude.messages.create(model=model, max_tokens=60, messages=kw["messages"],
                                 tools=[{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
                                        for t in (DATE, TIME)],
                                 extra_body={"temperature": 0,  # (the SDK has no temperature argument any more)
                                             "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    resp = oai.responses.create(model=model, input="Time?", max_output_tokens=60, temperature=0,
                                tools=[{"type": "function", **t["function"]} for t in (DATE, TIME)],
                                text={"format": {"type": "json_schema", "name": "call", "schema": schema}})
    if name == "get_stock":
        assert json.loads(r.choices[0].message.content)["name"] == "get_stock" and not r.choices[0].message.tool_calls
        assert streamed_text == r.choices[0].message.content and finishes == ["stop"] and not streamed_args
        assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "end_turn"
        assert [o.type for o in resp.output] == ["message"] and json.loads(resp.output_text)["name"] == "get_stock"
        return
    msg_ = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg_.content is None, r.choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg_.tool_calls] == [("get_time",
                                                                                                 {"zone": "CET"})]
    assert streamed_text == "" and finishes == ["tool_calls"] and json.loads(streamed_args) == {"zone": "CET"}
    assert msg.stop_reason == "tool_use" and [(b.type, b.name, b.input) for b in msg.content] == [
        ("tool_use", "get_time", {"zone": "CET"})]
    assert [(o.type, o.name, json.loads(o.arguments)) for o in resp.output] == [("function_call", "get_time",
                                                                                 {"zone": "CET"})]
    fence = '```json\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n```'  # as Qwen2.5-Coder writes it most
    kw = {**kw, "response_format": None, "extra_body": {"grammar": f"root ::= {json.dumps(fence)}"}}
    fenced = oai.chat.completions.create(**kw)
    assert fenced.choices[0].finish_reason == "tool_calls" and fenced.choices[0].message.content is None, fenced
    assert [json.loads(c.function.arguments) for c in fenced.choices[0].message.tool_calls] == [{"zone": "UTC"}]
