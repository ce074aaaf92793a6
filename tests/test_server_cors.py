"""--cors ORIGIN...: browser pages from those origins may call the API (preflight, the API key header, error
responses readable too); without it, no CORS header is ever sent."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from test_server_support import RUNTIME_SPEC, TEST_KEY, model_options, spec_options, wait_ready

from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.serving import ServerThread

PAGE = "http://localhost:3000"
CHAT = "/v1/chat/completions"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.fixture(scope="module", params=[(), (PAGE,), ("*",)], ids=["off", "one-origin", "any-origin"])
def server(tiny, request) -> Iterator[tuple[ServerThread, tuple[str, ...]]]:
    opts = model_options(tiny, draft=None, ctx=256)
    app = create_app(ServerOptions(api_key=TEST_KEY, cors=request.param),
                     lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None), spec_options())
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv, request.param


def _allowed(origins: tuple[str, ...], origin: str) -> bool:
    return "*" in origins or origin in origins


@pytest.mark.parametrize("origin", [PAGE, "http://evil.example"])
def test_preflight(server, origin):
    srv, origins = server
    r = httpx.options(f"{srv.url}{CHAT}", headers={"Origin": origin, **PREFLIGHT})
    if not _allowed(origins, origin):
        assert "access-control-allow-origin" not in r.headers, r.headers
        return
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in (origin, "*")
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.parametrize("origin", [PAGE, "http://evil.example"])
def test_requests_carry_the_header_when_the_origin_is_allowed(server, origin):
    srv, origins = server
    auth = {"Authorization": f"Bearer {TEST_KEY}", "Origin": origin}
    ok = httpx.post(f"{srv.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    headers=auth, timeout=30)
    listing = httpx.get(f"{srv.url}/v1/models", headers=auth)
    refused = httpx.get(f"{srv.url}/v1/models", headers={"Origin": origin})  # no key: 401, readable by the page
    assert (ok.status_code, listing.status_code, refused.status_code) == (200, 200, 401)
    for r in (ok, listing, refused):
        if _allowed(origins, origin):
            assert r.headers["access-control-allow-origin"] in (origin, "*"), r.headers
        else:
            assert not any(h.startswith("access-control-") for h in r.headers), r.headers
