"""Structured output over HTTP: response_format (the official client's parse() included), grammar, json_schema,
and the 400s for what cannot be compiled."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from pydantic import BaseModel, Field
from test_server_support import FIXED_DRAFTS, TEST_KEY, assert_identity, assert_openai_error, client, start, tiny_app

from tandem.server.serving import ServerThread

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}}}


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=10**7)
    capital: bool


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny))
    yield srv
    srv.stop()


def _chat(server, **kw) -> dict:
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Ann is 31."}],
                                                 "temperature": 0, "max_tokens": 80, **FIXED_DRAFTS, **kw})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("strict", [True, "true", "false", None])
def test_json_schema_response_validates_and_keeps_the_stats_identity(server, strict):
    spec = {"name": "person", "schema": PERSON, **({"strict": strict} if strict is not None else {})}
    body = _chat(server, response_format={"type": "json_schema", "json_schema": spec}, return_token_sources=True)
    choice = body["choices"][0]
    person = json.loads(choice["message"]["content"])
    assert set(person) == {"name", "age"} and 0 <= person["age"] <= 99 and len(person["name"]) <= 8
    assert choice["finish_reason"] == "stop"
    assert_identity(body["stats"])
    sources = choice["token_sources"]
    assert "".join(s["text"] for s in sources) == choice["message"]["content"]
    assert "grammar" in {s["source"] for s in sources}  # the property names were forced drafts


def test_json_object_and_speculation_do_not_change_the_output(server):
    outs = {d: _chat(server, response_format={"type": "json_object"}, draft_max=d)["choices"][0]["message"]["content"]
            for d in (0, 6)}
    assert outs[0] == outs[6]
    assert isinstance(json.loads(outs[0]), dict)


def test_official_client_parse_with_a_pydantic_model(server):
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    done = oai.beta.chat.completions.parse(model=oai.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "Paris, 2 million, capital."}],
                                           response_format=City, temperature=0, max_tokens=80)
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and len(city.name) <= 10


def test_gbnf_grammar_on_completions_and_llama_server_json_schema(server):
    with client(server) as c:
        r = c.post("/v1/completions", json={"prompt": "Is it?", "temperature": 0, "max_tokens": 10,
                                            "grammar": 'root ::= ("yes" | "no") "!"'})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in ("yes!", "no!")
        r = c.post("/v1/completions", json={"prompt": "Ann:", "temperature": 0, "max_tokens": 60,
                                            "json_schema": PERSON})
        assert r.status_code == 200, r.text
        assert set(json.loads(r.json()["choices"][0]["text"])) == {"name", "age"}


def test_a_schema_longer_than_max_tokens_ends_with_length_and_the_partial_text(server):
    body = _chat(server, max_tokens=4, response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('{"name')


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"grammar": 'root ::= "yes | "no"'}, "grammar"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "json_schema"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
])
def test_what_cannot_be_compiled_is_a_400_naming_the_field(server, fields, param):
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **fields})
    assert_openai_error(r, 400, param)


COUNTRY = {"type": "object", "properties": {  # no additionalProperties, no required: open unless strict
    "name": {"type": "string", "maxLength": 8}, "continent": {"type": "string", "enum": ["Europe", "Asia"]},
    "capital": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}}}}


def test_strict_json_schema_closes_every_object_and_requires_every_key(server):
    """OpenAI's strict mode: the model can neither add keys (before: it added them until max_tokens) nor leave
    any out, in nested objects too."""
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    r = oai.chat.completions.create(
        model=oai.models.list().data[0].id, messages=[{"role": "user", "content": "France?"}], temperature=0,
        max_tokens=200, response_format={"type": "json_schema", "json_schema": {
            "name": "country", "strict": True, "schema": COUNTRY}})
    out = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert list(out) == ["name", "continent", "capital"] and list(out["capital"]) == ["name"]


@pytest.mark.parametrize("extra", [True, {"type": "string"}])
def test_strict_json_schema_open_to_more_keys_is_refused_as_openai_does(server, extra):
    schema = {**COUNTRY, "properties": {**COUNTRY["properties"], "capital": {
        "type": "object", "additionalProperties": extra}}}
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "country", "strict": True, "schema": schema}}})
    err = assert_openai_error(r, 400, "response_format")
    assert "Invalid schema for response_format 'country'" in err["message"]
    assert "('properties', 'capital')" in err["message"] and "additionalProperties" in err["message"]
