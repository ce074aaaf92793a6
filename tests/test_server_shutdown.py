"""Graceful shutdown of the real `tandem serve`: on SIGTERM or Ctrl-C it stops accepting requests at once, lets
the running ones finish within --shutdown-timeout, ends the rest with an error that names the cause (a 503
body; an error event closing a stream), frees the port for a restart at once and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tandem.testing.serve import ServeProcess

KEY = "shutdown-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 1500
"""Tokens of a generation that is still running when the signal comes (seconds on the tiny models)."""


def serve(tiny, *extra: str, port: int = 0) -> ServeProcess:
    return ServeProcess(["--model", str(tiny["main"]), "--draft", "none", "--ctx-size", "2048", "--threads", "1",
                         "--port", str(port), "--api-key", KEY, *extra], env={**os.environ}).start()


def stream_events(url: str, out: list, first: threading.Event, max_tokens: int = LONG) -> None:
    """POST a streamed chat; every event's data goes to `out`, `first` is set at the first content."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line.removeprefix("data: "))
                first.set()
    first.set()


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_running_requests_finish_and_the_port_is_free_at_once(tiny, sig):
    server = serve(tiny)
    events: list = []
    first = threading.Event()
    client = threading.Thread(target=stream_events, args=(server.url, events, first))
    client.start()
    try:
        assert first.wait(60), events
        server.signal(sig)
        t0 = time.monotonic()
        deadline = t0 + 5
        while not refused(server.url):  # new connections are refused while the stream goes on
            assert time.monotonic() < deadline, "the server still accepts connections after the signal"
            time.sleep(0.05)
        assert client.is_alive() or events[-1] == "[DONE]"
        client.join(60)
        assert server.wait(30) == 0, "".join(server.stderr)
    finally:
        server.stop()
    assert events[0] == 200 and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["stats"]["stop_reason"] in ("eos", "length"), last["stats"]  # not cancelled: it ran to its end
    # A new server binds the same port at once.
    again = serve(tiny, port=server.port)
    try:
        r = httpx.post(f"{again.url}/v1/completions", json={"prompt": "Once", "max_tokens": 2}, headers=AUTH,
                       timeout=30)
        assert r.status_code == 200, r.text
    finally:
        assert again.stop() == 0


def test_requests_past_the_grace_period_end_with_an_error_naming_the_cause(tiny):
    server = serve(tiny, "--shutdown-timeout", "0.5", "--parallel", "1")  # one at a time: the second request queues
    events: list = []
    first = threading.Event()
    client = threading.Thread(target=stream_events, args=(server.url, events, first, 1900))
    client.start()
    queued: list[httpx.Response] = []
    assert first.wait(60), events
    waiter = threading.Thread(target=lambda: queued.append(httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 5}, headers=AUTH, timeout=60)))
    waiter.start()
    time.sleep(0.3)  # the second request waits behind the stream
    try:
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0, "".join(server.stderr)
        assert time.monotonic() - t0 < 10
        client.join(10)
        waiter.join(10)
    finally:
        server.stop()
    assert events[-1] != "[DONE]", "the generation finished: make it longer"
    err = json.loads(events[-1])["error"]
    assert err["code"] == "shutting_down" and "--shutdown-timeout" in err["message"], err
    r = queued[0]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "shutting_down", r.text
    with socket.socket() as s:  # the port is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
