"""The chat page: GET / (HTML), GET /chat.js and the vendored libraries under /vendor/ (Markdown, sanitising,
highlighting: see tandem/web/vendor/README.md), package files served with a strict content security policy.

The page holds no data, so it needs no API key; its requests to /v1 carry the key the user enters. It loads
nothing from other hosts (the machines it runs on may be offline), and the policy forbids it to.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

VENDOR_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
"""The files of tandem/web/vendor served under /vendor/, by suffix (not their licences and README)."""


def _pages() -> dict[str, tuple[str, str]]:
    pages = {"/": ("chat.html", "text/html; charset=utf-8"), "/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
    vendor = resources.files("tandem") / "web" / "vendor"
    for f in sorted(vendor.iterdir(), key=lambda f: f.name):
        suffix = f.name[f.name.rfind("."):]
        if f.is_file() and suffix in VENDOR_TYPES:
            pages[f"/vendor/{f.name}"] = (f"vendor/{f.name}", VENDOR_TYPES[suffix])
    return pages


PAGES = _pages()
"""Path -> (file under tandem/web, media type)."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Scripts and style sheets from this server only (no inline script), requests to this server only, and no
framing."""
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def web_router() -> APIRouter:
    """Routes for the chat page; the files are read once, when the app is built."""
    router = APIRouter()
    web = resources.files("tandem") / "web"
    for path, (name, media_type) in PAGES.items():
        body = web.joinpath(*name.split("/")).read_bytes()

        async def page(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        router.add_api_route(path, page, methods=["GET", "HEAD"], include_in_schema=False)
    return router
