"""The parts of the Ray Serve deployment that need no Ray: the prefix index the router keys on, what the
ingress reads from a request, the replica's ASGI bridge into a real Tandem app, its health verdicts, and the
scale-out options."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time
from types import SimpleNamespace

import pytest
from test_server_support import HELLO, TEST_KEY, tiny_app

from tandem.deploy.options import RayOptions
from tandem.deploy.prefix import PrefixIndex
from tandem.deploy.replica import Watchdog, exchange, health_problem, inject_fault
from tandem.deploy.request import TandemRequest, prompt_text, target_replica
from tandem.errors import BadInputError


def test_prefix_index_finds_the_replica_holding_the_longest_prefix():
    idx = PrefixIndex(block_chars=8)
    turn1 = "system: be brief. user: tell me about ships"
    idx.insert(turn1, "a")
    idx.insert("system: be brief. user: what is rain?", "b")
    turn2 = turn1 + " assistant: they float. user: and boats?"
    assert idx.match(turn2) == ("a", len(turn1) // 8 * 8)
    assert idx.match("system: be brief. user: what is rain? assistant: water") == ("b", 32)
    assert idx.match("something else entirely") == (None, 0)
    assert idx.match("short") == (None, 0)  # under one block: never a match
    idx.forget("a")
    holder, n = idx.match(turn2)
    assert holder == "b" and n == 24  # only the shared "system: be brief. user: " is still known (to b)


def test_a_next_turn_continues_its_conversation_and_a_shared_system_prompt_continues_none():
    idx = PrefixIndex(block_chars=8)
    system = "system: you are a helpful assistant who answers briefly. "
    turn1 = system + "user: tell me about ships"
    idx.insert(turn1, "a")
    other = system + "user: what is rain?"
    assert idx.match(other) == ("a", len(system) // 8 * 8)  # the shared system prompt is known...
    assert idx.continued(other) == (None, 0)  # ...but continues no earlier prompt: a new conversation
    idx.insert(other, "b")
    assert idx.continued(turn1 + " assistant: they float. user: and boats?") == ("a", len(turn1) // 8 * 8)
    assert idx.continued(other + " assistant: water. user: why?") == ("b", len(other) // 8 * 8)
    idx.forget("a")
    assert idx.continued(turn1 + " assistant: they float.") == (None, 0)


def test_prefix_index_stays_within_its_capacity():
    idx = PrefixIndex(capacity=10, block_chars=4)
    for i in range(20):
        idx.insert(f"{i:04d}" * 3, str(i))
    assert len(idx) == 10
    assert idx.match("0019" * 3) == ("19", 12) and idx.match("0000" * 3) == (None, 0)
    assert idx.continued("0019" * 3 + "more") == ("19", 12) and idx.continued("0000" * 3 + "more") == (None, 0)


def test_prompt_text_keys_chats_and_completions():
    chat = json.dumps({"messages": [{"role": "system", "content": "S"},
                                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).encode()
    text = prompt_text("/v1/chat/completions", chat)
    assert text.index("S") < text.index("hi") and "system" in text and "user" in text
    longer = json.dumps({"messages": [{"role": "system", "content": "S"},
                                      {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo"}]}).encode()
    assert prompt_text("/v1/chat/completions", longer).startswith(text)  # later turns extend earlier ones
    assert prompt_text("/v1/completions", b'{"prompt": "Once upon"}') == "Once upon"
    assert prompt_text("/v1/completions", b'{"prompt": ["first", "second"]}') == "first"
    assert prompt_text("/v1/completions", b"not json") == ""
    assert prompt_text("/health", chat) == ""
    assert target_replica("/metrics", b"replica=abc") == "abc"
    assert target_replica("/health", b"replica=abc") == "abc"
    assert target_replica("/v1/models", b"replica=abc") is None


def _messages(app, req: TandemRequest, stop_after: int | None = None) -> list[dict]:
    async def go() -> list[dict]:
        out = []
        gen = exchange(app, req)
        async for m in gen:
            out.append(m)
            if stop_after is not None and len(out) >= stop_after:
                await gen.aclose()
                break
        return out
    return asyncio.run(go())


@pytest.fixture(scope="module")
def app(tiny):
    a = tiny_app(tiny, draft=None)
    a.state.engine.start()
    while a.state.engine.status.state == "loading":
        time.sleep(0.02)
    yield a
    a.state.engine.stop()


def _req(body: dict) -> TandemRequest:
    headers = ((b"authorization", f"Bearer {TEST_KEY}".encode()), (b"content-type", b"application/json"))
    raw = json.dumps(body).encode()
    return TandemRequest("POST", "/v1/chat/completions", b"", headers, raw,
                         prefix=prompt_text("/v1/chat/completions", raw))


def test_exchange_replays_a_request_into_the_tandem_app(app):
    whole = _messages(app, _req({"messages": HELLO, "max_tokens": 5}))
    assert whole[0]["type"] == "http.response.start" and whole[0]["status"] == 200
    body = json.loads(b"".join(m.get("body", b"") for m in whole[1:]))
    assert body["usage"]["completion_tokens"] == 5
    stream = _messages(app, _req({"messages": HELLO, "max_tokens": 5, "stream": True}))
    text = b"".join(m.get("body", b"") for m in stream[1:]).decode()
    assert text.count("data: ") >= 6 and text.rstrip().endswith("data: [DONE]")
    denied = _messages(app, TandemRequest("POST", "/v1/chat/completions", b"", (), b"{}"))
    assert denied[0]["status"] == 401  # the app's own checks still apply


def test_closing_the_exchange_stops_the_generation(app):
    part = _messages(app, _req({"messages": HELLO, "max_tokens": 3000, "stream": True}), stop_after=2)
    assert part[0]["status"] == 200
    engine = app.state.engine
    while engine.running or engine.waiting:  # the cancelled generation ends (it would run 3000 tokens)
        time.sleep(0.02)
    after = _messages(app, _req({"messages": HELLO, "max_tokens": 2}))
    assert json.loads(after[1]["body"])["usage"]["completion_tokens"] == 2


def test_health_reports_a_failed_engine(tiny):
    def broken():
        raise RuntimeError("the GPU fell off")

    a = tiny_app(tiny, draft=None, factory=broken)
    engine = a.state.engine
    engine.start()
    while engine.status.state == "loading":
        time.sleep(0.02)
    problem = health_problem(engine, Watchdog(60.0))
    engine.stop()
    assert problem is not None and "engine failed" in problem and "GPU fell off" in problem


def test_watchdog_flags_work_without_progress_only():
    dog = Watchdog(timeout=10.0)
    busy = SimpleNamespace(running=1, waiting=2, progress=0)
    assert not dog.hung(busy, now=0.0)
    assert not dog.hung(busy, now=5.0)
    assert dog.hung(busy, now=11.0)  # busy and stuck
    busy.progress += 1  # a token or a step resets the clock
    assert not dog.hung(busy, now=12.0)
    assert not dog.hung(busy, now=20.0)
    assert not dog.hung(SimpleNamespace(running=0, waiting=0, progress=1), now=100.0)  # nothing to do: no hang
    assert not dog.hung(busy, now=105.0)
    assert dog.hung(busy, now=111.0)


def test_one_long_generation_is_progress_not_a_hang(app):
    """A lone generation (--parallel 1) that outlasts the watchdog's timeout: its tokens are progress. The
    watchdog's clock moves 0.4 timeouts between polls (20 ms apart), so three polls in a row without a token say
    hung: counting only finished generations would."""
    engine = app.state.engine
    dog = Watchdog(timeout=1.0)
    with cf.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_messages, app, _req({"messages": HELLO, "max_tokens": 200, "ignore_eos": True}))
        while engine.running == 0 and not answer.done():
            time.sleep(0.001)
        seen, clock = [], 0.0
        while engine.running and not answer.done():
            clock += 0.4 * dog.timeout
            seen.append(dog.hung(engine, now=clock))
            time.sleep(0.02)
    assert answer.result()[0]["status"] == 200
    assert len(seen) >= 5  # (the premise: the generation outlasts two timeouts of the watchdog's clock)
    assert seen == [False] * len(seen)


def test_a_stalled_engine_is_hung_once_work_waits_behind_it(app):
    """Engine.stall, the fault inject_fault uses for `x-tandem-fault: hang`: the engine thread stops; idle that
    is no hang, but a request queued behind it with no progress for the watchdog's timeout is."""
    engine = app.state.engine
    assert not inject_fault(engine, _req({"messages": HELLO}))  # only the header asks for it
    dog, release = Watchdog(timeout=0.3), threading.Event()
    engine.stall(release)
    with cf.ThreadPoolExecutor(1) as pool:
        try:
            assert health_problem(engine, dog) is None
            answer = pool.submit(_messages, app, _req({"messages": HELLO, "max_tokens": 2}))
            deadline = time.monotonic() + 30  # a bound on waiting, not a measurement
            while (problem := health_problem(engine, dog)) is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            release.set()
        assert problem is not None and problem.startswith("engine hung: 0 running, 1 waiting"), problem
        assert answer.result(timeout=60)[0]["status"] == 200  # released, it serves the request
    assert health_problem(engine, dog) is None


def test_ray_options():
    assert not RayOptions().enabled
    assert RayOptions(replicas=2).initial_replicas() == 2
    auto = RayOptions(min_replicas=1, max_replicas=3)
    assert auto.enabled and auto.autoscaling and auto.initial_replicas() == 1
    assert RayOptions(replicas=5, min_replicas=1, max_replicas=3).initial_replicas() == 3
    for bad in (RayOptions(min_replicas=3, max_replicas=2), RayOptions(replicas=-1),
                RayOptions(replicas=2, target_ongoing_requests=0)):
        with pytest.raises(BadInputError):
            bad.check()


def test_a_replica_keeps_as_many_conversations_cached_as_it_has_sequences(tiny):
    """With --parallel 2, two interleaved conversations each find their earlier turn cached: a new one takes
    the empty sequence rather than the other's, with which it shares only the chat template. (Prefix-affinity
    routing pays only if a replica keeps several conversations warm.)"""
    from dataclasses import replace

    from test_server_support import RUNTIME_SPEC, model_options, spec_options

    from tandem.runtime import Runtime
    from tandem.server import ServerOptions, create_app

    opts = replace(model_options(tiny, draft=None, ctx=4096), parallel=2)
    a = create_app(ServerOptions(api_key=TEST_KEY), lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None),
                   spec_options())
    a.state.engine.start()
    try:
        while a.state.engine.status.state == "loading":
            time.sleep(0.02)
        convs = [[{"role": "user", "content": f"Conversation {c}: a question about topic {c} that is long "
                                              "enough to matter to the cache."}] for c in range(2)]
        before = [0, 0]
        for turn in range(3):
            for c, conv in enumerate(convs):
                msgs = _messages(a, _req({"messages": conv, "max_tokens": 8, "temperature": 0}))
                done = json.loads(b"".join(m.get("body", b"") for m in msgs[1:]))
                if turn:
                    assert done["usage"]["prompt_tokens_details"]["cached_tokens"] >= before[c] - 2, (turn, c, done)
                before[c] = done["usage"]["prompt_tokens"]
                conv += [done["choices"][0]["message"], {"role": "user", "content": f"and {turn}?"}]
    finally:
        a.state.engine.stop()
