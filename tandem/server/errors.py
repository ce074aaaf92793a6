"""The one place where exceptions become HTTP responses: OpenAI's error body, the status from the error type."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from tandem.errors import BadInputError, EngineError, TandemError

log = logging.getLogger("tandem.server")

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|\[|^function-|^json-")
"""Pydantic loc entries that name a union member or validator, not a field."""


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(str(part)):
            out += ("." if out else "") + str(part)
    return out


def validation_error(errors: list[dict]) -> BadInputError:
    """A BadInputError naming the first invalid field, its problem, and how to fix it.

    For a field that failed every member of a union (str | list[...]), the deepest error is the telling one.
    """
    if not errors:
        return BadInputError("the request body is invalid", "see docs/api.md for the accepted fields")
    field = tuple(errors[0].get("loc", ()))[:1]
    first = max((e for e in errors if tuple(e.get("loc", ()))[:1] == field), key=lambda e: len(e.get("loc", ())))
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        cause = f"{param} is required"
    else:
        msg = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
        got = first.get("input")
        shown = repr(got) if isinstance(got, str | int | float | bool) or got is None else type(got).__name__
        cause = f"{param}: {msg} (got {shown[:80]})" if param else msg
    others = {str(tuple(e.get("loc", ()))[:1]) for e in errors} - {str(field)}
    more = f" ({len(others)} more invalid field(s))" if others else ""
    return BadInputError(cause + more, "fix the field and retry; docs/api.md lists the fields and their types",
                         param=param or None, code="invalid_value")


def to_tandem_error(exc: Exception, route: str = "") -> TandemError:
    """Any exception as a typed TandemError (unknown ones become a 500 EngineError); `route` is "METHOD /path"."""
    if isinstance(exc, TandemError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return validation_error(list(exc.errors()))
    if isinstance(exc, HTTPException):
        cause = {404: f"{route} is not an endpoint of this server",
                 405: f"{route}: method not allowed"}.get(exc.status_code, f"{route}: {exc.detail}")
        err = TandemError(cause, "docs/api.md lists the endpoints and their methods", code=str(exc.status_code))
        err.http_status = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return err
    return EngineError(f"internal error: {type(exc).__name__}: {exc}", "see the server log; retry the request")


def error_response(err: TandemError) -> JSONResponse:
    retry = getattr(err, "retry_after", None)
    return JSONResponse(err.to_openai(), status_code=err.http_status,
                        headers={"Retry-After": str(retry)} if retry else None)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type the app can raise to OpenAI's error body."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        route = f"{request.method} {request.url.path}"
        err = to_tandem_error(exc, route)
        if err.http_status >= 500 and not isinstance(exc, TandemError):
            log.error("%s: unhandled %s: %s", route, type(exc).__name__, exc, exc_info=exc)
        else:
            log.info("%s -> %d: %s", route, err.http_status, err.message)
        response = error_response(err)
        if isinstance(exc, HTTPException) and exc.headers:  # 405's Allow header
            response.headers.update(exc.headers)
        return response

    for exc_type in (TandemError, ValidationError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
