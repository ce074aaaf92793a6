"""GET /openapi.json: the app's routes with the request bodies and error responses they really have.

The generation routes read and validate their bodies themselves (tandem.server.body: size limit first, then
JSON, then the pydantic model, every failure a 400 in OpenAI's shape), so FastAPI cannot see those bodies;
`request_body(Model)` publishes the model's JSON schema for a route, and `install(app)` moves the models'
definitions into the document's components. Every route lists the error statuses it can answer, each with
OpenAI's error body (ErrorBody); FastAPI's own 422 validation error is never sent, so it is not listed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tandem.server.schemas import ErrorBody

_REF = "#/components/schemas/{model}"

STATUS_WHY = {
    400: "Bad input: malformed JSON, a wrong type or value, an unsupported field value, a prompt over the context",
    401: "Missing or wrong API key",
    403: "A model or draft path outside the models folder",
    404: "Unknown model or draft",
    413: "Body larger than --max-body-bytes",
    422: "A draft whose vocabulary differs from the main model's, or that is not smaller",
    500: "The engine failed",
    503: "Loading, failed to load, shutting down, or too many requests waiting (Retry-After)",
    507: "A draft whose memory plan does not fit",
}
"""Each error status the API answers, and when (docs/api.md, "Errors")."""


STREAM_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": _REF.format(model="Completion")},
                                     {"$ref": _REF.format(model="ErrorBody")}]}}]}}}
"""One server-sent event of a streamed completion: a chunk, an error, or the final [DONE]."""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: each status with OpenAI's error body."""
    return {status: {"model": ErrorBody, "description": STATUS_WHY[status]} for status in statuses}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: a required JSON body described by `model` (see install)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def install(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Make app.openapi() publish `models` (the request bodies named by request_body) in its components."""
    by_name = {m.__name__: m for m in models}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, model in by_name.items():
            schema = model.model_json_schema(ref_template=_REF, mode="validation")
            components.update(schema.pop("$defs", {}))
            components[name] = schema
        for path in doc.get("paths", {}).values():
            for op in path.values():
                responses = op.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    del responses["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            if unused not in str(doc.get("paths")):
                components.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
