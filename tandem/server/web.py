"""The chat page: GET / (HTML) and GET /chat.js, package files served with a strict content security policy.

The page holds no data, so it needs no API key; its requests to /v1 carry the key the user enters. It loads
nothing from other hosts (the machines it runs on may be offline), and the policy forbids it to.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

PAGES = {"/": ("chat.html", "text/html; charset=utf-8"), "/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
"""Path -> (file in tandem/web, media type)."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Scripts from this server only (no inline script), requests to this server only, and no framing."""
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def web_router() -> APIRouter:
    """Routes for the chat page; the files are read once, when the app is built."""
    router = APIRouter()
    web = resources.files("tandem") / "web"
    for path, (name, media_type) in PAGES.items():
        body = (web / name).read_bytes()

        async def page(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        router.add_api_route(path, page, methods=["GET", "HEAD"], include_in_schema=False)
    return router
