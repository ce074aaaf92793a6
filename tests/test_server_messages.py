"""The refusal table of docs/api.md ("Messages OpenAI refuses"): each row is sent to the server as written
there, and must get its status with OpenAI's error body naming its `param`; the accepted shapes the section
names are served."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server_support import TEST_KEY, assert_openai_error, client, start, tiny_app

from tandem.server.serving import ServerThread

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
CHAT = "/v1/chat/completions"
_ROW = re.compile(r"^\| (?P<what>[^|]+) \| (?P<messages>.+) \| (?P<status>\d{3}) \| `(?P<param>[^`]+)` \|$")


def table() -> dict[str, tuple[object, int, str]]:
    """Combination -> (messages, or None for a body without them; status; param), from docs/api.md."""
    text = DOC.read_text()
    section = text[text.index("## Messages OpenAI refuses"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        m = _ROW.match(line)
        if m is None:
            continue
        cell = m["messages"].strip()
        messages = None if cell.startswith("(") else json.loads(cell.strip("`"))
        rows[m["what"].strip()] = (messages, int(m["status"]), m["param"])
    return rows


ROWS = table()


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny, draft=None, ctx=256))
    yield srv
    srv.stop()


def test_the_table_has_every_kind_of_row():
    assert len(ROWS) >= 25
    params = {p for _, _, p in ROWS.values()}
    assert {"messages", "messages[0].role", "messages[0].content", "messages[0].content[0]",
            "messages[0].tool_call_id", "messages[0].name"} <= params


@pytest.mark.parametrize("what", list(ROWS))
def test_refused_as_the_table_says(server, what):
    messages, status, param = ROWS[what]
    body = {"max_tokens": 2} if messages is None else {"messages": messages, "max_tokens": 2}
    r = httpx.post(f"{server.url}{CHAT}", json=body, headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30)
    err = assert_openai_error(r, status, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": "ann"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "developer", "content": "Be brief."}, {"role": "tool", "tool_call_id": "c1", "content": "42"},
     {"role": "user", "content": "and?"}],
], ids=["empty-string", "text-parts", "system-and-name", "ends-with-assistant", "developer-and-tool"])
def test_accepted(server, messages):
    with client(server) as c:
        r = c.post(CHAT, json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
