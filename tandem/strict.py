"""OpenAI's strict mode for JSON schemas (response_format json_schema and function parameters with strict: true).

Strict mode treats every object as closed and every property as required: OpenAI refuses a strict schema that
does not say so; Tandem says it for the schema (additionalProperties false, required = all properties, in nested
objects, array items, anyOf/oneOf/allOf branches and $defs alike), so that a model cannot add keys until
max_tokens. What strict mode cannot express (an object open to more keys) is refused with OpenAI's error.
"""

from __future__ import annotations

from typing import Any

from tandem.errors import BadInputError

_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else")
"""Keywords whose value is one schema."""
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
"""Keywords whose value is a list of schemas."""
_NAMED = ("properties", "$defs", "definitions")
"""Keywords whose value maps names to schemas."""


def strict_schema(schema: Any, name: str, *, param: str = "response_format") -> Any:
    """`schema` with every object closed and all its properties required (a new schema; the input is unchanged).
    `name` names the schema in errors (OpenAI's "Invalid schema for response_format 'NAME': ...")."""
    return _close(schema, (), name, param)


def _is_object(node: dict) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or \
        (kind is None and ("properties" in node or "additionalProperties" in node))


def _close(node: Any, path: tuple, name: str, param: str) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _NAMED:
        if isinstance(out.get(key), dict):
            out[key] = {k: _close(v, (*path, key, k), name, param) for k, v in out[key].items()}
    for key in _ONE:
        if key in out:
            out[key] = _close(out[key], (*path, key), name, param)
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [_close(v, (*path, key, i), name, param) for i, v in enumerate(out[key])]
    if _is_object(out):
        where = f"Invalid schema for {name}: In context={path!r}"
        fix = ("list every key under properties and drop additionalProperties/patternProperties (strict mode closes "
               "every object), or send strict: false")
        if out.get("additionalProperties", False) is not False:
            raise BadInputError(f"{where}, 'additionalProperties' must be false in strict mode", fix, param=param)
        if out.get("patternProperties"):
            raise BadInputError(f"{where}, 'patternProperties' is not supported in strict mode", fix, param=param)
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties") or {})
    return out
