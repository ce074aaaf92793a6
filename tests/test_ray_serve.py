"""Tandem on Ray Serve, end to end: `tandem serve --replicas 2` starts a local Ray instance with two Tandem
replicas (tiny models, one thread each), serves the OpenAI API through Ray's proxy, routes a conversation's
turns to the replica holding its prefix, survives one replica being killed and one whose engine hangs, and
stops with nothing left running. Skipped where Ray Serve is not installed (pip install 'tandem[ray]')."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'tandem[ray]' runs these tests")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'tandem[test]')")

from tandem.deploy.replica import FAULT_HEADER, FAULTS_ENV  # noqa: E402
from tandem.deploy.request import PID_HEADER, REPLICA_HEADER  # noqa: E402
from tandem.testing.serve_process import ServeProcess, child_env  # noqa: E402

pytestmark = pytest.mark.ray
STARTUP_S = 300.0
HANG_TIMEOUT_S = 10.0
"""The cluster's --hang-timeout: short enough for a hung replica to be replaced within its test, longer than any
generation the tests ask for (with --parallel 1 the engine shows progress as each generation ends)."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tiny, tmp_path_factory, *extra: str, **env_extra: str) -> ServeProcess:
    home = tmp_path_factory.mktemp("ray-user")
    env = child_env(TANDEM_MODELS_DIR=str(home / "models"), TANDEM_CONFIG=str(home / "models.toml"),
                    RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", **env_extra)
    args = ["--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--threads", "1",
            "--replica-cpus", "1", "--port", str(_port()), *extra]
    return ServeProcess(args, env).start(STARTUP_S)


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    """Two replicas; a large --affinity-slack so prefix affinity holds however requests queue; a short
    --hang-timeout and the test-only fault injection (tandem.deploy.replica.inject_fault) for the hang test."""
    srv = _serve(tiny, tmp_path_factory, "--replicas", "2", "--affinity-slack", "100", "--parallel", "1",
                 "--hang-timeout", f"{HANG_TIMEOUT_S:g}", **{FAULTS_ENV: "1"})
    yield srv
    srv.stop()


class _Client(openai.OpenAI):
    """The official client, pointed at the Ray proxy, naming the served model."""

    def __init__(self, srv: ServeProcess, model: str):
        super().__init__(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = model


@pytest.fixture(scope="module")
def model(tiny) -> str:
    return tiny["main"].stem


def _chat(client: _Client, messages: list[dict], max_tokens: int = 8) -> tuple[str, str, object]:
    """(replica id, reply text, usage) of one non-streaming chat completion."""
    raw = client.chat.completions.with_raw_response.create(model=client.model, messages=messages, max_tokens=max_tokens,
                                                           temperature=0)
    done = raw.parse()
    return raw.headers[REPLICA_HEADER], done.choices[0].message.content, done.usage


def _conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Conversation {i}: tell me a long story about the number {i} and "
                                        f"why {i} matters to mathematicians, sailors and cooks alike."}]


def test_openai_client_through_ray_proxy(cluster, model):
    client = _Client(cluster, model)
    replica, text, usage = _chat(client, [{"role": "user", "content": "hello"}])
    assert replica and text and usage.completion_tokens == 8
    with client.chat.completions.with_streaming_response.create(
            model=client.model, messages=[{"role": "user", "content": "stream please"}], max_tokens=12, stream=True,
            stream_options={"include_usage": True}) as resp:
        assert resp.headers[REPLICA_HEADER]
        chunks = list(resp.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 12
    done = client.completions.create(model=client.model, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert done.usage.completion_tokens == 6
    # the same page and stats as a single server
    assert "<html" in httpx.get(f"{cluster.url}/", timeout=60).text.lower()
    health = httpx.get(f"{cluster.url}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert health.headers[REPLICA_HEADER] and int(health.headers[PID_HEADER]) > 0


def test_both_replicas_serve_and_turns_follow_their_prefix(cluster, model):
    client = _Client(cluster, model)
    convs = [_conversation(i) for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:  # concurrent first turns spread over the least-loaded replicas
        firsts = list(pool.map(lambda m: _chat(client, m, 16), convs))
    homes = {r: i for i, (r, _, _) in enumerate(firsts)}
    assert len(homes) == 2, firsts
    # One conversation homed on each replica, their turns interleaved: each replica's prefix cache holds
    # its own conversation only if every turn goes back to it. (The second turn may find the cache used by
    # the other first turns its replica served; from the third on it holds this conversation alone.)
    state = {i: (firsts[i][1], firsts[i][2].prompt_tokens) for i in homes.values()}
    for turn in range(3):
        for home, i in homes.items():
            reply, before = state[i]
            convs[i] += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And {turn}?"}]
            replica, reply, usage = _chat(client, convs[i], 16)
            assert replica == home, f"turn {turn + 2} of conversation {i} left its replica"
            cached = usage.prompt_tokens_details.cached_tokens
            if turn > 0:
                assert cached >= before - 2, (turn, cached, before)  # the whole earlier prompt was reused
            state[i] = (reply, usage.prompt_tokens)


def test_each_replicas_gauges_reach_rays_metrics_export(cluster):
    """`tandem serve --replicas` prints the node's Ray metrics URL; every replica's ray_tandem_* gauges are
    there, labelled by replica (the earlier tests sent both replicas prompts)."""
    import re

    url = next(m.group(1) for line in cluster.output if (m := re.search(r"Ray metrics.*(http://\S+)", line)))
    deadline = time.monotonic() + 120  # Ray exports on its own period; a bound on waiting, not a measurement
    queries: dict[str, float] = {}
    while len(queries) < 2 and time.monotonic() < deadline:
        text = httpx.get(url, timeout=30).text
        queries = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "ray_tandem_prefix_cache_queries" and "replica" in s.labels}
        time.sleep(1.0)
    assert len(queries) == 2 and all(v > 0 for v in queries.values()), queries
    assert "ray_tandem_kv_cache_usage_ratio" in text and "ray_tandem_requests_waiting" in text


def _scrape(url: str, replica: str) -> tuple[str, dict[str, float]]:
    r = httpx.get(f"{url}/metrics", params={"replica": replica}, timeout=60)
    return r.headers[REPLICA_HEADER], {s.name: s.value for f in text_string_to_metric_families(r.text)
                                       for s in f.samples if not s.labels}


def test_killed_replica_restarts_and_loses_no_request_that_had_not_begun(cluster, model):
    client = _Client(cluster, model)
    prompt = "A shared opening that pins every request below to one replica, the one about to be killed."
    long = client.completions.with_streaming_response.create(model=client.model, prompt=prompt, max_tokens=2000,
                                                             stream=True)
    resp = long.__enter__()
    victim, pid = resp.headers[REPLICA_HEADER], int(resp.headers[PID_HEADER])
    stream = resp.parse()
    assert next(iter(stream)).choices[0].text is not None  # it began on the victim
    queued = 4

    def follow(i: int) -> tuple[str, int]:
        if i % 2:
            with client.completions.with_streaming_response.create(
                    model=client.model, prompt=prompt + f" {i}", max_tokens=5, stream=True) as r:
                return r.headers[REPLICA_HEADER], sum(1 for c in r.parse() if c.choices and c.choices[0].text)
        raw = client.completions.with_raw_response.create(model=client.model, prompt=prompt + f" {i}", max_tokens=5)
        return raw.headers[REPLICA_HEADER], raw.parse().usage.completion_tokens

    with cf.ThreadPoolExecutor(queued) as pool:
        later = [pool.submit(follow, i) for i in range(queued)]
        deadline = time.monotonic() + STARTUP_S  # a bound on waiting, not a measurement
        while True:  # until they wait behind the long one on the victim (its own gauges, asked by id)
            served_by, m = _scrape(cluster.url, victim)
            assert served_by == victim
            if m["tandem_queue_depth"] >= queued:
                break
            assert time.monotonic() < deadline, f"the requests never queued on the victim: {m}"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="replica serving this request stopped"):
            for _ in stream:
                pass
        resp.close()
        results = [f.result(timeout=300) for f in later]
    assert all(r != victim and n >= 1 for r, n in results), results  # resent elsewhere, answered in full
    seen: set[str] = set()
    deadline = time.monotonic() + STARTUP_S  # a bound on waiting, not a measurement
    fresh = iter(range(100, 10**6))  # new conversations: no prefix ties them to the survivor
    while len(seen) < 2 and time.monotonic() < deadline:  # Ray replaces the dead replica: two live ones again
        with cf.ThreadPoolExecutor(4) as pool:
            seen |= set(pool.map(lambda i: _chat(client, _conversation(i), 2)[0], [next(fresh) for _ in range(4)]))
        time.sleep(1.0)
    assert victim not in seen and len(seen) == 2, seen


def _controller_log(srv: ServeProcess) -> str:
    """The text of the Serve controller's log of this `tandem serve` (it prints where Ray's Serve logs are)."""
    folder = next(m.group(1) for line in srv.output if (m := re.search(r"Ray Serve logs.*: (/\S+)", line)))
    return "".join(p.read_text(errors="replace") for p in sorted(Path(folder).glob("controller_*.log")))


def _served_by(client: _Client, messages: list[dict]) -> tuple[str, int]:
    """(replica id, pid) that answered a two-token chat completion, checked to be whole."""
    raw = client.chat.completions.with_raw_response.create(model=client.model, messages=messages, max_tokens=2,
                                                           temperature=0)
    assert raw.parse().usage.completion_tokens == 2
    return raw.headers[REPLICA_HEADER], int(raw.headers[PID_HEADER])


def test_hung_replica_is_reported_unhealthy_and_replaced_while_the_other_serves(cluster, model):
    """`x-tandem-fault: hang` (the cluster runs with TANDEM_TEST_FAULTS=1) stops one replica's engine thread for
    good. A request that waits there shows no progress for --hang-timeout: the replica's check_health fails,
    Ray stops it and starts another, and the waiting request goes to another replica. Every request sent
    meanwhile is answered; afterwards two replicas serve, the hung one not among them."""
    client = _Client(cluster, model)
    prompt = "The opening of a conversation whose next turn goes back to the replica about to hang."
    first = client.completions.with_raw_response.create(model=client.model, prompt=prompt, max_tokens=2)
    victim, pid = first.headers[REPLICA_HEADER], int(first.headers[PID_HEADER])
    hang = httpx.get(f"{cluster.url}/health", params={"replica": victim}, headers={FAULT_HEADER: "hang"}, timeout=60)
    assert hang.status_code == 200 and hang.headers[REPLICA_HEADER] == victim
    done = threading.Event()
    fresh = iter(range(1000, 10**6))  # new conversations: no prefix ties them to a replica

    def meanwhile() -> list[tuple[str, int]]:
        """Requests one after another until told to stop: (replica, pid) of each; raises if one fails."""
        served = []
        while not done.is_set():
            served.append(_served_by(client, _conversation(next(fresh))))
            time.sleep(0.5)
        return served

    with cf.ThreadPoolExecutor(2) as pool:
        try:
            stuck = pool.submit(lambda: client.completions.with_raw_response.create(
                model=client.model, prompt=prompt + " The next turn.", max_tokens=2))
            deadline = time.monotonic() + 60  # a bound on waiting, not a measurement
            while _scrape(cluster.url, victim)[1]["tandem_queue_depth"] < 1:  # it waits behind the hang
                assert time.monotonic() < deadline and not stuck.done(), "the next turn did not wait on the victim"
                time.sleep(0.2)
            others = pool.submit(meanwhile)
            # hung after --hang-timeout, three failed checks 2 s apart, a 5 s graceful stop: then resent
            finished, _ = cf.wait([stuck], timeout=HANG_TIMEOUT_S + 90)
            assert finished, f"the hung replica was not replaced within {HANG_TIMEOUT_S + 90:g} s"
            raw = stuck.result()
            assert raw.headers[REPLICA_HEADER] != victim and raw.parse().usage.completion_tokens == 2
            seen: dict[str, int] = {}
            deadline = time.monotonic() + STARTUP_S  # a bound on waiting, not a measurement
            while len(seen) < 2 and time.monotonic() < deadline:  # the replacement serves: two live ones again
                with cf.ThreadPoolExecutor(4) as burst:
                    seen.update(burst.map(lambda i: _served_by(client, _conversation(i)),
                                          [next(fresh) for _ in range(4)]))
                time.sleep(1.0)
        finally:
            done.set()
        served = others.result(timeout=120)
    assert len(seen) == 2 and victim not in seen and pid not in seen.values(), seen
    assert served and all(r != victim for r, _ in served), served  # all answered, none by the hung replica
    log = _controller_log(cluster)
    assert re.search(rf"Replica\(id='{victim}'.*failed the health check \d+ times in a row", log), log[-3000:]
    assert re.search(r"engine hung: \d+ running, [1-9]\d* waiting", log), log[-3000:]
    cluster.remember_children()  # the replacement too must be gone once it stops


def test_stops_cleanly_with_nothing_left_running(cluster):
    rc, left = cluster.stop()
    assert rc == 0, "\n".join(cluster.output[-30:])
    assert left == [], f"processes outlived tandem serve: {left}"
    assert "stopped" in cluster.output


def test_autoscales_from_one_replica_to_two_under_load(tiny, tmp_path_factory, model):
    """--min-replicas 1 --max-replicas 2 --target-ongoing-requests 1: Ray adds the second replica once more
    than one request per replica stays ongoing (docs/scale-out.md, "Autoscaling")."""
    srv = _serve(tiny, tmp_path_factory, "--min-replicas", "1", "--max-replicas", "2",
                 "--target-ongoing-requests", "1")
    try:
        client = _Client(srv, model)
        first = {_chat(client, [{"role": "user", "content": f"warm up {i}"}], 2)[0] for i in range(3)}
        assert len(first) == 1  # it starts with one replica
        seen: set[str] = set(first)
        fresh = iter(range(10**6))
        deadline = time.monotonic() + STARTUP_S  # a bound on waiting, not a measurement
        while len(seen) < 2 and time.monotonic() < deadline:  # 6 long requests at a time keep it loaded
            with cf.ThreadPoolExecutor(6) as pool:
                seen |= set(pool.map(lambda i: _chat(client, _conversation(i), 300)[0],
                                     [next(fresh) for _ in range(6)]))
        assert len(seen) == 2, seen
    finally:
        rc, left = srv.stop()
    assert rc == 0 and left == [], (rc, left)


def test_serve_run_builder_takes_tandem_serve_options(tiny):
    """`serve run tandem.deploy.ray:app key=value ...` and Serve config files: `tandem serve` flags without
    their dashes, checked as the command checks them."""
    from tandem.deploy.ray import app, to_argv

    assert to_argv({"model": "m.gguf", "threads": 1, "affinity": "false", "exact": "true"}) == [
        "--model", "m.gguf", "--threads", "1", "--no-affinity", "--exact"]
    built = app({"model": str(tiny["main"]), "draft": "none", "threads": "1", "replicas": "2"})
    assert built is not None
    with pytest.raises(Exception, match="--min-replicas 3 / --max-replicas 2"):
        app({"model": str(tiny["main"]), "min_replicas": "3", "max_replicas": "2"})
