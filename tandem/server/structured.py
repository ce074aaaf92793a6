"""Structured output requests: OpenAI's `response_format` and llama-server's `grammar` / `json_schema` fields,
compiled to the one Grammar a generation is constrained by (tandem.spec.grammar)."""

from __future__ import annotations

import json
from typing import Any

from tandem.errors import BadInputError
from tandem.spec.grammar import Grammar
from tandem.strict import strict_schema

_FORMAT_FIX = ('send {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
               '{"name": "...", "schema": {...}, "strict": true}}')


def grammar_of(response_format: dict[str, Any] | None, grammar: str | None = None,
               json_schema: dict[str, Any] | None = None) -> Grammar | None:
    """The constraint a request asks for (None: free text). At most one of the three fields may constrain."""
    asked = [name for name, v in (("response_format", _constrains(response_format)), ("grammar", grammar),
                                  ("json_schema", json_schema)) if v is not None]
    if len(asked) > 1:
        raise BadInputError(f"{' and '.join(asked)} both constrain the output", f"send only one of {', '.join(asked)}",
                            param=asked[1])
    if grammar is not None:
        return Grammar.gbnf(grammar, param="grammar")
    if json_schema is not None:
        return Grammar.json_schema(json_schema, param="json_schema")
    return _response_format(response_format)


def _constrains(rf: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if rf is None or rf.get("type", "text") == "text" else rf


def _response_format(rf: dict[str, Any] | None) -> Grammar | None:
    if rf is None:
        return None
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = rf.get("schema")  # llama-server accepts a schema here too
        return Grammar.json_object() if schema is None else Grammar.json_schema(schema, param="response_format.schema")
    if kind != "json_schema":
        raise BadInputError(f"response_format type {kind!r} is not supported", _FORMAT_FIX,
                            param="response_format.type")
    spec = rf.get("json_schema", rf)  # llama-server also takes {"type": "json_schema", "schema": {...}}
    if not isinstance(spec, dict):
        raise BadInputError("response_format.json_schema must be an object", _FORMAT_FIX,
                            param="response_format.json_schema")
    strict = spec.get("strict", False)
    if strict not in (True, False, None, "true", "false"):
        raise BadInputError(f"response_format.json_schema.strict must be true or false, got {strict!r}",
                            "send true or false", param="response_format.json_schema.strict")
    if "schema" not in spec:
        raise BadInputError("response_format.json_schema has no schema", _FORMAT_FIX,
                            param="response_format.json_schema.schema")
    schema = spec["schema"]
    if strict in (True, "true"):  # every object closed, every property required (tandem.strict)
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError:
                pass  # Grammar.json_schema names the error
        schema = strict_schema(schema, f"response_format {spec.get('name', 'schema')!r}")
    # without strict, the output is held to the schema as sent: an object without additionalProperties: false
    # stays open to more keys, as JSON Schema says
    return Grammar.json_schema(schema, param="response_format.json_schema.schema")
