"""Tool calls read from model output (every format, whole and streamed), the generic prompt, and
the response bodies they give (checked against the official openai client's types)."""

from __future__ import annotations

import json
import random

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tandem import tools
from tandem.server.responses import Builder, Piece
from tandem.spec.generate import Done, Token
from tandem.spec.stats import SpecStats
from tandem.tools import ToolRequest, ToolStream, call_deltas, parse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
AUTO = ToolRequest((WEATHER, TIME))

# (format, model output, expected content, expected [(name, arguments object)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
               '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
     None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>',
     None, [("get_weather", {"city": "Rome"})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}', None,
     [("get_weather", {"city": "Lima"})]),  # cut before the closing tag
    ("hermes", "It is <tool_call>not json</tool_call>", "It is <tool_call>not json</tool_call>", []),
    ("hermes", "No call here, just text.", "No call here, just text.", []),
    ("hermes", "A tag-like end <tool", "A tag-like end <tool", []),
    # Qwen2.5-Coder under tool_choice auto: the call as a whole-answer JSON block, fenced or bare
    ("hermes", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None,
     [("get_weather", {"city": "Paris"})]),
    ("hermes", '\n```\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
               '\n```\n', None, [("get_time", {}), ("get_weather", {"city": "Rome"})]),
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ("hermes", '```JSON\n{"name": "get_time", "arguments": "{}"}', None, [("get_time", {})]),  # cut before ```
    ("hermes", '```json\n{"name": "get_stock", "arguments": {"ticker": "X"}}\n```',  # not a declared tool
     '```json\n{"name": "get_stock", "arguments": {"ticker": "X"}}\n```', []),
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Oslo"}, "why": "asked"}',  # more than a call
     '{"name": "get_weather", "arguments": {"city": "Oslo"}, "why": "asked"}', []),
    ("hermes", '{"name": "get_weather"}', '{"name": "get_weather"}', []),  # no arguments: a JSON answer, not a call
    ("hermes", '```json\n{"name": "get_time", "arguments": {}}\n```\nThis asks for the time.',
     '```json\n{"name": "get_time", "arguments": {}}\n```\nThis asks for the time.', []),  # text around it
    ("hermes", 'Call it so: {"name": "get_time", "arguments": {}}', 'Call it so: {"name": "get_time", "arguments": {}}',
     []),
    ("hermes", '```python\nprint("hi")\n```', '```python\nprint("hi")\n```', []),
    ("hermes", "[1] A footnote.", "[1] A footnote.", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": '
               '{"city": "Bern"}}', None, [("get_time", {}), ("get_weather", {"city": "Bern"})]),
    ("llama3", "{not json at all", "{not json at all", []),
    ("llama3", "The weather is fine.", "The weather is fine.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}, "id": "abc123XYZ"}]', None,
     [("get_weather", {"city": "Nice"})]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', "Sure.", [("get_time", {})]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Kyiv"}}]}', None,
     [("get_weather", {"city": "Kyiv"})]),
    ("generic", '  {"tool_call": {"name": "get_time", "arguments": {}}}', None, [("get_time", {})]),
    ("generic", '{"response": "It is sunny."}', "It is sunny.", []),
    ("generic", "Plain words, no JSON.", "Plain words, no JSON.", []),
    ("generic", '{"tool_calls": [{"arguments": {}}]}', '{"tool_calls": [{"arguments": {}}]}', []),  # no name
]


def _expect(parsed: tools.Parsed, content, calls) -> None:
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert all(c.id for c in parsed.calls)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parse_every_format(fmt, text, content, calls):
    _expect(parse(text, fmt, AUTO), content, calls)


def test_mistral_keeps_the_models_call_id():
    parsed = parse('[TOOL_CALLS] [{"name": "get_time", "arguments": {}, "id": "abc123XYZ"}]', "mistral", AUTO)
    assert parsed.calls[0].id == "abc123XYZ"


def _stream(text: str, fmt: str, req: ToolRequest, sizes: list[int]) -> tuple[list[str], tools.Parsed]:
    stream, out, pos = ToolStream(fmt, req), [], 0
    for n in sizes:
        out.append(stream.feed(text[pos:pos + n]))
        pos += n
    out.append(stream.feed(text[pos:]))
    return out, stream.finish()


def _assemble(deltas: list[list[dict]]) -> list[dict]:
    """Streamed delta.tool_calls put back together the way OpenAI clients do: by index, strings appended."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for d in delta:
            c = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = d.get("id") or c["id"]
            c["name"] += d.get("function", {}).get("name", "")
            c["arguments"] += d.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_streamed_pieces_reassemble_to_the_whole_answer(fmt, text, content, calls):
    rng = random.Random(len(text))
    for _ in range(20):
        sizes = [rng.randint(1, 5) for _ in range(len(text))]
        sent, rest = _stream(text, fmt, AUTO, sizes)
        streamed = "".join(sent) + (rest.content or "")
        assert (streamed or None) == content or (streamed == "" and content == "")
        got = _assemble(call_deltas(rest.calls))
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
        assert all(c["id"] for c in got)


def test_text_before_a_call_goes_out_before_the_end():
    stream = ToolStream("hermes", AUTO)
    assert stream.feed("Checking the weather") == "Checking the weather"
    assert stream.feed(" now.\n<tool") == " now."  # the possible marker and the whitespace before it wait
    assert stream.feed('_call>{"name": "get_time", "arguments": {}}</tool_call>') == ""
    rest = stream.finish()
    assert rest.content is None and [c.name for c in rest.calls] == ["get_time"]


def test_a_json_answer_is_held_in_the_json_formats_and_in_hermes_as_qwen_writes_a_call_under_auto():
    assert ToolStream("generic", AUTO).feed('{"response": "hi"') == ""
    assert ToolStream("llama3", AUTO).feed('{"name"') == ""
    assert ToolStream("mistral", AUTO).feed('{"a": 1}') == '{"a": 1}'
    hermes = ToolStream("hermes", AUTO)
    assert hermes.feed('{"a": 1}') == ""  # may be a whole-answer call: held, and text at the end when it is not one
    assert hermes.finish() == tools.Parsed('{"a": 1}')
    for text in ("Sure, ", "{ not json", "```python\n", "`code`"):  # what cannot open a JSON call goes out at once
        assert ToolStream("hermes", AUTO).feed(text) == text.rstrip(), text
    fenced = ToolStream("hermes", AUTO)
    assert fenced.feed("``") == "" and fenced.feed("`js") == "" and fenced.feed('on\n{"name": "get_time",') == ""
    assert fenced.feed(' "arguments": {}}\n```') == ""
    assert fenced.feed("\nThat") == '```json\n{"name": "get_time", "arguments": {}}\n```\nThat'  # text after it
    assert fenced.feed(" is all.") == " is all." and fenced.finish() == tools.Parsed("")


@pytest.mark.parametrize("choice,parallel,names", [("get_weather", True, ["get_weather"]),
                                                   ("auto", False, ["get_time"])])
def test_a_json_answer_of_calls_keeps_the_named_function_and_one_call_without_parallel(choice, parallel, names):
    text = '```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Bern"}}]' \
           '\n```'
    assert [c.name for c in parse(text, "hermes", ToolRequest((WEATHER, TIME), choice, parallel)).calls] == names
    assert tools.whole_json_calls(text, ToolRequest((WEATHER,))) is None  # get_time is not declared there


def test_named_choice_keeps_only_that_function_and_parallel_false_keeps_one():
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", ' \
          '"arguments": {"city": "Oslo"}}</tool_call>'
    named = parse(two, "hermes", ToolRequest((WEATHER, TIME), choice="get_weather"))
    assert [c.name for c in named.calls] == ["get_weather"]
    one = parse(two, "hermes", ToolRequest((WEATHER, TIME), parallel=False))
    assert [c.name for c in one.calls] == ["get_time"]
    other = parse('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "hermes",
                  ToolRequest((WEATHER, TIME), choice="get_weather"))
    assert other.calls == () and "get_time" in other.content  # not the named function: the text comes back


def test_generic_messages_offer_tools_and_rewrite_the_history():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = tools.generic_messages(history, ToolRequest((WEATHER,), choice="required", parallel=False))
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can call tools.")
    assert '"name": "get_weather"' in out[0]["content"] and "You must call at least one tool" in out[0]["content"]
    assert "(at most one call)" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"},
                                                             "id": "call_1"}]}
    assert out[3] == {"role": "user", "content": json.dumps({"tool_response": {"tool_call_id": "call_1",
                                                                               "content": "sunny"}})}
    plain = tools.generic_messages([{"role": "user", "content": "hi"}], AUTO)
    assert plain[0]["role"] == "system" and '{"response": "<your answer>"}' in plain[0]["content"]


def test_tool_schema_problems_are_named():
    assert tools.tool_schema_problem({"type": "object", "properties": {"a": {"type": "string"}}}) is None
    assert tools.tool_schema_problem({}) is None
    assert "not 'object'" in tools.tool_schema_problem({"type": "array"})
    assert "properties.a" in tools.tool_schema_problem({"type": "object", "properties": {"a": 1}})
    assert "required" in tools.tool_schema_problem({"type": "object", "required": "a"})


# -- response bodies ---------------------------------------------------------------------------------------
def _events(text: str) -> list:
    stats = SpecStats()
    stats.stop_reason = "eos"
    return [Token(i, ch, "main") for i, ch in enumerate(text)] + [Done(stats)]


def _builder(fmt: str, req: ToolRequest | None) -> Builder:
    b = Builder("chat", "tiny", token_sources=False)
    b.read_tool_calls(fmt, req)
    return b


def test_whole_response_with_calls_is_an_openai_chat_completion():
    text = 'On it.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    body = _builder("hermes", AUTO).whole(Piece.of(_events(text)))
    r = ChatCompletion.model_validate(body)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content == "On it."
    call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_whole_response_without_a_call_keeps_finish_reason_stop():
    body = _builder("generic", ToolRequest((WEATHER,), choice="required")).whole(Piece.of(_events("Just text.")))
    r = ChatCompletion.model_validate(body)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "Just text."
    assert r.choices[0].message.tool_calls is None


def test_streamed_response_with_calls_reassembles_in_openai_chunks():
    text = 'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    b = _builder("hermes", AUTO)
    events = _events(text)
    lines: list[str] = []
    for i in range(0, len(events), 3):
        lines += b.stream(Piece.of(events[i:i + 3]), first=i == 0, include_usage=False)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(ln[6:])) for ln in lines[:-1]]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Checking."
    deltas = [[d.model_dump(exclude_none=True) for d in c.choices[0].delta.tool_calls]
              for c in chunks if c.choices[0].delta.tool_calls]
    calls = _assemble(deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                         ("get_time", {})]
    first = chunks.index(next(c for c in chunks if c.choices[0].delta.tool_calls))
    assert chunks[first].choices[0].delta.tool_calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
