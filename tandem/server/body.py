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


def check_api_key(request: Request, key: str | None) -> None:
    """Raise AuthError unless the request carries `Authorization: Bearer <key>` (no-op when key is None)."""
    if key is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise AuthError("this server requires an API key and the request has no Authorization header", _KEY_FIX,
                        code="missing_api_key")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthError("the API key in the Authorization header is wrong", _KEY_FIX, code="invalid_api_key")


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
