"""Strict JSON schemas (tandem.strict) and the grammars of required tool calls (tandem.tool_grammar), checked with
llguidance's matcher over the tiny models' vocabularies: what they accept and refuse, in each tool format."""

from __future__ import annotations

import json
from collections.abc import Iterator

import llguidance
import pytest

from tandem.engine.llama import Model
from tandem.errors import BadInputError
from tandem.spec.grammar import Grammar
from tandem.strict import strict_schema
from tandem.testing.tiny import QWEN_TOOLS, build_extra
from tandem.tool_grammar import PARALLEL_MAX, CallGrammar, scan
from tandem.tools import ToolRequest, parse

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
CITY = {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {}}}},
    "where": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]}},
    "$defs": {"point": {"type": "object", "properties": {"lat": {"type": "number"}}}}}


@pytest.fixture(scope="module")
def models(tiny) -> Iterator[dict[str, Model]]:
    out = {"smol": Model(tiny["main"]), "qwen": Model(build_extra(tiny["main"].parent, QWEN_TOOLS))}
    yield out
    for m in out.values():
        m.close()


def accepts(model: Model, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes `text` (tokenized as the model would) and may stop after it."""
    tok = model.grammar_tokenizer()
    matcher = llguidance.LLMatcher(tok, grammar.spec, log_level=0)
    ids = tok.tokenize_str(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_strict_closes_every_object_and_requires_every_property():
    out = strict_schema(CITY, "response_format 'city'")
    assert out["additionalProperties"] is False and out["required"] == ["name", "tags", "where"]
    item = out["properties"]["tags"]["items"]
    assert item["additionalProperties"] is False and item["required"] == ["t"]
    assert out["$defs"]["point"] == {"type": "object", "properties": {"lat": {"type": "number"}},
                                     "additionalProperties": False, "required": ["lat"]}
    assert "additionalProperties" not in CITY and "required" not in CITY["$defs"]["point"]  # the input is unchanged


@pytest.mark.parametrize("extra", [True, {"type": "string"}])
def test_strict_refuses_an_object_open_to_more_keys(extra):
    schema = {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": extra}}}
    with pytest.raises(BadInputError) as e:
        strict_schema(schema, "response_format 'x'")
    assert e.value.param == "response_format"
    assert "('properties', 'a')" in e.value.message and "strict: false" in e.value.fix


def test_strict_grammar_refuses_extra_keys_that_the_open_one_lets_repeat(models):
    m = models["smol"]
    open_, strict = Grammar.json_schema(CITY), Grammar.json_schema(strict_schema(CITY, "x"))
    full = '{"name": "Oslo", "tags": [{"t": 1}], "where": {"lat": 59.9}}'
    looping = '{"name": "Oslo", "capital": true, "capital": true, "capital": true}'
    assert accepts(m, strict, full) and not accepts(m, strict, '{"name": "Oslo"}')
    assert not accepts(m, strict, full[:-1] + ', "capital": true}')
    assert not accepts(m, strict, '{"name": "Oslo", "tags": [{"t": 1, "u": 2}], "where": null}')
    # without strict the schema is kept as sent: an extra key may repeat without end (JSON Schema allows it)
    assert accepts(m, open_, looping)


def test_required_calls_use_the_vocabularys_special_tokens(models):
    req = ToolRequest((TIME,), choice="required", parallel=False)
    qwen, smol = CallGrammar(req, "hermes", models["qwen"]), CallGrammar(req, "hermes", models["smol"])
    assert qwen.lark(1).startswith('start: call "\\n"?\ncall: <[3]> ')  # the special token, as the model writes it
    assert smol.lark(1).startswith('start: call "\\n"?\ncall: "<tool_call>" ')  # plain text in a vocabulary without one
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    for m, g in ((models["qwen"], qwen), (models["smol"], smol)):
        assert accepts(m, g.grammar(1), call)
        assert not accepts(m, g.grammar(1), call + "\n" + call)  # parallel_tool_calls false: one call
        assert accepts(m, g.grammar(1), call + "\n")  # and the newline Qwen2.5 writes after it
    tok = models["qwen"].grammar_tokenizer()
    forced = llguidance.LLMatcher(tok, qwen.grammar(1).spec, log_level=0).compute_ff_tokens()
    assert forced[:1] == [3]  # the forced draft is the special token, which the grammar then takes


@pytest.mark.parametrize("fmt,one,join", [
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "%s"}}\n</tool_call>', "\n"),
    ("generic", '{"name": "get_time", "arguments": {"zone": "%s"}}', ", "),
])
def test_parallel_calls_are_bounded(models, fmt, one, join):
    g = CallGrammar(ToolRequest((TIME,), choice="required"), fmt, models["smol"])
    assert g.most == PARALLEL_MAX
    calls = [one % z for z in ("UTC", "CET") * PARALLEL_MAX]
    text = (lambda n: join.join(calls[:n])) if fmt == "hermes" else \
        (lambda n: '{"tool_calls": [' + join.join(calls[:n]) + "]}")
    assert accepts(models["smol"], g.grammar(PARALLEL_MAX), text(PARALLEL_MAX))
    assert not accepts(models["smol"], g.grammar(PARALLEL_MAX), text(PARALLEL_MAX + 1))
    assert not accepts(models["smol"], g.grammar(2), text(3))


def test_scan_finds_finished_calls_and_started_ones():
    a, b = '{"name": "f", "arguments": {"x": 1}}', '{"name": "f", "arguments": {"x": 2}}'
    canon = json.dumps(json.loads(a), sort_keys=True)
    assert scan("generic", '{"tool_calls": [' + a + ", " + a[:9]) == ([canon], 2)
    assert scan("generic", '{"tool_calls": [' + a + ", " + b + "]}")[1] == 2
    assert scan("mistral", "[TOOL_CALLS] [" + a + ", " + a) == ([canon, canon], 2)
    assert scan("hermes", f"<tool_call>\n{a}\n</tool_call>\n<tool_call>\n{{") == ([canon], 2)
    assert scan("generic", '{"tool_calls": [' + a + ",") == ([canon], 2)  # a token ending a call and starting one
    assert scan("hermes", f"<tool_call>\n{a}\n</tool_call>\n") == ([canon], 1)  # a newline may end the answer
    assert scan("hermes", f"<tool_call>\n{a}\n</tool_call>\n<") == ([canon], 2)
    assert scan("generic", '{"tool_') == ([], 0)


def test_a_repeated_call_is_read_once():
    call = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
    other = call.replace("UTC", "CET")
    out = parse('{"tool_calls": [' + ", ".join([call, call, other, call]) + "]}", "generic",
                ToolRequest((TIME,), choice="required"))
    assert [json.loads(c.arguments)["zone"] for c in out.calls] == ["UTC", "CET"]
