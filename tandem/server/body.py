"""Request guards that run before any parsing: the API key and the body size, then JSON and schema parsing."""

from __future__ import annotations

import hmac
import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tandem.errors import AuthError, BadInputError, BodyTooLargeError
from tandem.server.errors import validation_error

M = TypeVar("M", bound=BaseModel)

_KEY_FIX = "send the header 'Authorization: Bearer KEY' with the key given to `tandem serve --api-key`"


def api_keys(key: str | None) -> list[str]:
    """The keys `--api-key` accepts: one, or several separated by commas (one per client)."""
    return [k.strip() for k in key.split(",") if k.strip()] if key else []


def check_api_key(request: Request, key: str | None) -> None:
    """Raise AuthError unless the request carries `Authorization: Bearer <key>` with one of the keys (no-op when key
    is None)."""
    if key is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise AuthError("this server requires an API key and the request has no Authorization header", _KEY_FIX,
                        code="missing_api_key")
    if key_index(request, key) is None:
        raise AuthError("the API key in the Authorization header is wrong", _KEY_FIX, code="invalid_api_key")


def key_index(request: Request, key: str | None) -> int | None:
    """Which of the server's keys the request carries (None: none of them, or the server has no key)."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    found = None
    for i, k in enumerate(api_keys(key)):  # every key compared, in constant time each
        if hmac.compare_digest(token.strip().encode(), k.encode()):
            found = i
    return found


def lookup_scope(request: Request, key: str | None, suffix_cache: str) -> str | None:
    """The suffix cache scope of a request (GenParams.lookup_scope): with --suffix-cache shared, one per API key
    (all requests share one when the server has no key); None (the request's own text only) otherwise."""
    if suffix_cache != "shared":
        return None
    return "" if key is None else f"key{key_index(request, key)}"


def _too_large(limit: int, size: str) -> BodyTooLargeError:
    return BodyTooLargeError(f"the request body is {size} bytes, over this server's limit of {limit} bytes",
                             "send a shorter prompt, or start the server with a larger --max-body-bytes",
                             code="body_too_large")


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes (by Content-Length and as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadInputError(f"Content-Length {declared!r} is not a number", "send a valid Content-Length")
        if int(declared) > limit:
            raise _too_large(limit, declared)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise _too_large(limit, f"more than {limit}")
    if not buf.strip():
        raise BadInputError("the request body is empty", "send a JSON object, e.g. {\"messages\": [...]}",
                            code="invalid_json")
    try:
        data = json.loads(bytes(buf))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"the request body is not valid JSON: {e}",
                            "send a JSON object with Content-Type: application/json", code="invalid_json") from e
    if not isinstance(data, dict):
        raise BadInputError(f"the request body is a JSON {type(data).__name__}, not an object",
                            "send a JSON object, e.g. {\"messages\": [...]}", code="invalid_json")
    return data


def parse(model: type[M], data: dict) -> M:
    """Validate `data` against a request model; errors become a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(list(e.errors())) from e
