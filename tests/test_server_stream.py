"""Server-sent events on the wire, and what a client that goes away mid-stream does to the engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from test_server_support import HELLO, TEST_KEY, assert_identity, client, metrics, sample, start, tiny_app

from tandem.server.serving import ServerThread

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny, ctx=2048))
    yield srv
    srv.stop()


def raw_lines(server: ServerThread, path: str, body: dict) -> list[str]:
    with client(server) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode().split("\n")


def events(lines: list[str]) -> list[str]:
    """The data payloads; every non-blank line must be a `data: ` line and each event ends with a blank line."""
    out = []
    for i, line in enumerate(lines):
        if line:
            assert line.startswith("data: "), line
            assert lines[i + 1] == "", "events are separated by a blank line"
            out.append(line.removeprefix("data: "))
    return out


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_wire_format(server, include_usage):
    body = {"messages": HELLO, "max_tokens": 20, "temperature": 0, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    data = events(raw_lines(server, CHAT, body))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[-1]
    assert {"usage", "stats", "timings"} <= set(last)
    assert all("stats" not in c for c in chunks[:-1]), "only the last chunk carries the stats"
    assert last["usage"]["completion_tokens"] == 20 == last["stats"]["generated_tokens"]
    assert_identity(last["stats"])
    if include_usage:
        assert last["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"
    else:
        assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes.count("length") == 1 and finishes[-1] == "length"


def test_streamed_text_equals_non_streamed_text(server):
    for path, body in ((CHAT, {"messages": HELLO}), ("/v1/completions", {"prompt": "The sea is"})):
        body = {**body, "max_tokens": 60, "temperature": 0}
        with client(server) as c:
            whole = c.post(path, json=body).json()
        chunks = [json.loads(d) for d in events(raw_lines(server, path, {**body, "stream": True}))[:-1]]
        if path == CHAT:
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == whole["choices"][0]["message"]["content"]
        else:
            assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        # the same but for the prompt tokens the second request found cached (the first one's BOS at least)
        details = "prompt_tokens_details"
        assert {**chunks[-1]["usage"], details: None} == {**whole["usage"], details: None}


def _open_stream(server: ServerThread, max_tokens: int) -> socket.socket:
    """Send a streaming request on a raw socket and read until a few chunks have arrived."""
    u = urlsplit(server.url)
    body = json.dumps({"messages": HELLO, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "draft_model": "none"}).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 4:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    return sock


def test_client_disconnect_frees_the_engine_within_a_second(server):
    """Without cancellation the 2000-token generation would hold the engine for seconds."""
    with client(server) as c:
        reference = c.post(CHAT, json={"messages": HELLO, "max_tokens": 30, "temperature": 0}).json()
    before = metrics(server.url)
    sock = _open_stream(server, max_tokens=2000)
    sock.close()
    t0 = time.perf_counter()
    with client(server) as c, c.stream("POST", CHAT, json={"messages": HELLO, "max_tokens": 30, "temperature": 0,
                                                           "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        started = time.perf_counter() - t0
        rest = [line for line in lines if line.startswith("data: ")]
    assert started < 1.0, f"the next request's first chunk came {started:.2f} s after the disconnect"
    after = metrics(server.url)
    assert sample(after, "tandem_generations_total", stop_reason="cancelled") \
        - sample(before, "tandem_generations_total", stop_reason="cancelled") == 1
    generated = sample(after, "tandem_generated_tokens_total") - sample(before, "tandem_generated_tokens_total")
    assert generated - 30 < 1500, "the disconnected generation ran on"
    # The engine is not corrupted: the same request gives the same text as before the disconnect.
    chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest][:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reference["choices"][0]["message"]["content"]


def test_disconnect_while_queued_skips_the_request(server):
    """A client that leaves while waiting its turn never runs: two abandoned streams, then a quick request."""
    before = metrics(server.url)
    first = _open_stream(server, max_tokens=2000)
    u = urlsplit(server.url)
    body = json.dumps({"messages": HELLO, "max_tokens": 2000, "temperature": 0}).encode()
    queued = socket.create_connection((u.hostname, u.port), timeout=30)
    queued.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.3)
    queued.close()
    time.sleep(0.5)  # the queued request's handler notices within its 0.2 s poll
    first.close()
    t0 = time.perf_counter()
    with client(server) as c:
        r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and time.perf_counter() - t0 < 1.5
    after = metrics(server.url)
    generations = sum(v - sample(before, name, **dict(labels)) for (name, labels), v in after.items()
                      if name == "tandem_generations_total")
    assert generations == 2, "the abandoned queued request must not have been generated"


def test_held_back_text_is_streamed_at_the_end(server):
    """Text that might begin a stop string is held back; when the stop never completes it still arrives."""
    body = {"messages": HELLO, "max_tokens": 25, "temperature": 0, "return_token_sources": True}
    with client(server) as c:
        base = c.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
        stop = base[-3:] + "\x00never"  # its start is the very end of the text: held until the end
        whole = c.post(CHAT, json={**body, "stop": stop}).json()
    assert whole["choices"][0]["message"]["content"] == base
    assert whole["choices"][0]["token_sources"][-1]["source"] == "main"
    chunks = [json.loads(d) for d in events(raw_lines(server, CHAT, {**body, "stop": stop, "stream": True}))[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(deltas) == base
    assert base[-3:] in [d for d in deltas if d][-1], "the held-back tail comes in the last text chunk"
    for c in chunks[1:]:
        choice = c["choices"][0]
        assert "".join(s["text"] for s in choice["token_sources"]) == (choice["delta"].get("content") or "")


def test_requests_take_no_worker_threads(server):
    """Concurrent keyed requests, streamed and whole, leave the process with the threads it had: the key check
    and the stream's cleanup run on the event loop, not on a worker pool that grows a thread per request at once
    and keeps them."""

    def one(i: int) -> None:
        body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
        with client(server) as c:
            r = c.post(CHAT, json=body)
        assert r.status_code == 200, r.text
    one(0)
    one(1)
    before = {t.ident for t in threading.enumerate()}
    workers = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == [], f"threads started by the requests and still alive: {left}"
