"""The openai and anthropic SDKs' core calls against `tandem serve` on the real pair's main model (Qwen2.5-Coder-1.5B-
Instruct Q4_K_M, --draft none): what the tiny fixtures cannot show, that a real model's answers and tool calls come
back whole, streamed and round-tripped in each SDK's own types. Skipped when the model file is not there (about a
minute or two of CPU when it is).

The model is $TANDEM_REAL_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (default folder /work/models); `tandem
models --models-dir DIR pull qwen2.5-coder-1.5b-instruct-q4_k_m` fetches it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tandem.testing.serve_process import ServeProcess, child_env

MODEL = Path(os.environ.get("TANDEM_REAL_MODELS") or "/work/models") / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=(
    f"the real pair's main model {MODEL} is not there: set TANDEM_REAL_MODELS to the folder that holds it, or fetch "
    "it with `tandem models --models-dir DIR pull qwen2.5-coder-1.5b-instruct-q4_k_m`"))

WEATHER_FN = {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}},
              "required": ["city"]}
ASK = "What is the weather in Paris right now?"
RESULT = "sunny, 22 C"
T0 = {"temperature": 0}
"""Greedy decoding on the Messages API (the anthropic SDK has no temperature argument any more)."""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve` on the real main, once for the module; away from the user's models folder and settings."""
    home = tmp_path_factory.mktemp("real")
    env = child_env(TANDEM_MODELS_DIR=str(home / "models"), TANDEM_CONFIG=str(home / "models.toml"))
    server = ServeProcess(["--model", str(MODEL), "--draft", "none", "--ctx-size", "4096", "--port", "0"], env=env)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_openai_responses_whole_streamed_and_a_function_call_round_trip(url):
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    model = oai.models.list().data[0].id
    kw = dict(model=model, input="Write a Python function add(a, b) that returns their sum. Reply with code only.",
              max_output_tokens=40, temperature=0)
    whole = oai.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and "def add" in whole.output_text, whole
    events = list(oai.responses.create(**kw, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text == whole.output_text  # greedy: the same text either way

    tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
              "parameters": WEATHER_FN}]
    r = oai.responses.create(model=model, input=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False,
                             max_output_tokens=60, temperature=0)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather", r.output
    assert "paris" in json.loads(call.arguments)["city"].lower()
    answer = oai.responses.create(model=model, previous_response_id=r.id, tools=tools, max_output_tokens=40,
                                  temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                         "output": RESULT}])
    # (what the 1.5B model makes of the result varies: after it, it may write another call as text)
    assert answer.status in ("completed", "incomplete") and answer.output and answer.usage.output_tokens > 0
    assert answer.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens  # the call and the result in it


def test_anthropic_messages_create_stream_and_a_tool_use_round_trip(url):
    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=300)
    model = openai.OpenAI(base_url=f"{url}/v1", api_key="none").models.list().data[0].id
    kw = dict(model=model, max_tokens=40, extra_body=T0, system="You are a concise coding assistant.",
              messages=[{"role": "user", "content": "Name the Python keyword that defines a function. One word."}])
    whole = claude.messages.create(**kw)
    text = "".join(b.text for b in whole.content if b.type == "text")
    assert whole.stop_reason in ("end_turn", "max_tokens") and "def" in text, whole
    assert whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0) > 10 and whole.usage.output_tokens
    with claude.messages.stream(**kw) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == "".join(b.text for b in final.content if b.type == "text") == text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens

    tools = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_FN}]
    ask = [{"role": "user", "content": ASK}]
    r = claude.messages.create(model=model, max_tokens=60, extra_body=T0, tools=tools, messages=ask,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use", r
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and "paris" in use.input["city"].lower(), use
    history = [*ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": RESULT}]}]
    answer = claude.messages.create(model=model, max_tokens=40, extra_body=T0, tools=tools, messages=history)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use") and answer.content, answer
    prompt = answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0)
    assert prompt == claude.messages.count_tokens(model=model, tools=tools, messages=history).input_tokens
    without = [*history[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id}]}]
    assert prompt >= claude.messages.count_tokens(model=model, tools=tools, messages=without).input_tokens + 3
