"""A soak with faults: `tandem serve` (a child process) under a fixed number of mixed requests from concurrent
clients, then a check that nothing was lost, leaked or miscounted.

The traffic (tandem.benchmarks.soak_plan, drawn from --seed): chat and completions, streamed and whole, greedy
and seeded, with the server's draft, with it named in draft_model, and with draft_model "none"; a share of
malformed requests (each must get its typed 4xx with OpenAI's error body naming the field), of streams the
client closes after a random number of chunks, and of long whole requests the client stops waiting for.
Before the load, a warm-up, then every distinct deterministic request alone (the expected texts); after it,
the same requests alone again. The checks (tandem.benchmarks.soak_checks): every request answered exactly
once (completed, typed error, or the client's own disconnect); greedy and seeded texts under load equal to
the request alone; the server's open descriptors and threads back to their level after the warm-up and its
RSS grown less than --rss-growth; /metrics counts equal to the client's. Prints a table and the checks,
writes every number to --out (JSON), and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tandem.benchmarks.soak_checks import (Check, ProcSample, Scrape, accounting, delta, metrics, prompt_sizes,
                                           resources, same_text, scrape)
from tandem.benchmarks.soak_plan import Outcome, Shot, make_plan, send
from tandem.cli.options import add_options, build
from tandem.errors import BadInputError, EngineError
from tandem.models.defaults import default_pair, draft_path
from tandem.testing.tiny import build_fixture_set

HELP = "a soak with faults: thousands of mixed requests, then checks for lost requests, leaks and metrics"
"""One line for `tandem bench --help`."""
API_KEY = "soak-key"
"""The key the soak's server requires (requests without it must get 401)."""


@dataclass
class SoakOptions:
    """Soak."""

    requests: int = 2000
    """Requests in the load (the warm-up and the requests sent alone come on top)."""
    concurrency: int = 4
    """Clients sending at once, each on its own keep-alive connection."""
    parallel: int = 1
    """The server's --parallel: requests decoded together (continuous batching); 1 decodes one at a time."""
    seed: int = 0
    """Seed of the traffic: the same seed, the same requests in the same order."""
    model: str | None = None
    """Main model GGUF (default: the embedded pair's main, or --tiny's)."""
    draft: str | None = None
    """Draft model GGUF (default: the embedded draft, or --tiny's)."""
    tiny: str | None = None
    """Build the tiny test models (tandem.testing.tiny) into this folder and soak on them."""
    ctx_size: int = 512
    """Positions per request: the server gets --ctx-size parallel x this."""
    max_tokens: int = 24
    """Largest max_tokens of a request (the others ask for a third of it)."""
    threads: int = 1
    """The server's --threads."""
    exact: bool = True
    """Serve with --exact, so that texts with a draft, without one and batched are bit for bit the same."""
    bad_share: float = 0.1
    """Share of malformed requests."""
    disconnect_share: float = 0.1
    """Share of requests that stream and are closed by the client mid-stream; about half as many long whole
    requests are abandoned by their client after a moment."""
    warmup: int = 300
    """Mixed requests sent before the baseline is taken (not counted), then two long ones per sequence at once:
    enough for the server's memory to reach its working size."""
    trace_every: int = 100
    """Read the server's RSS every this many requests of the load (the JSON's rss_trace)."""
    settle: float = 10.0
    """Seconds to wait, at most, for the server to count every request and go idle after the load, and again
    for its descriptors and threads to come back down."""
    rss_growth: float = 0.05
    """Most relative RSS growth from after the warm-up to after the load; a negative value skips the check."""
    out: str = "bench/out/soak.json"
    """JSON result file."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, SoakOptions)


class SoakServer:
    """`tandem serve` in a child process on a free loopback port, until close()."""

    def __init__(self, opts: SoakOptions, main: Path, draft: Path, log: Path):
        self.cmd = [sys.executable, "-m", "tandem", "--log-level", "WARNING", "serve", "--model", str(main),
                    "--draft", str(draft), "--ctx-size", str(opts.ctx_size * opts.parallel), "--parallel",
                    str(opts.parallel), "--threads", str(opts.threads), "--port", "0", "--api-key", API_KEY,
                    "--no-pause-slow-draft", "--max-queue", str(max(64, 2 * opts.concurrency)),
                    "--exact" if opts.exact else "--no-exact"]
        self._log = log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="soak-server-stdout", daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if m := re.search(r"serving on (http://\S+)", line):
                self.url = m.group(1)
            if line.startswith("ready:"):
                return self.url
            if not line or line.startswith("NOT SERVING"):
                break
        self.close()
        raise EngineError(f"`{' '.join(self.cmd)}` did not get ready", f"see its log, {self._log.name}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)


def run_load(url: str, shots: list[Shot], concurrency: int, draft_id: str | None, n_ctx: int,
             on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send the shots from `concurrency` clients at once (each takes the next unsent one); their outcomes in order."""
    outcomes: list[Outcome | None] = [None] * len(shots)
    todo = iter(range(len(shots)))
    lock = threading.Lock()

    def worker() -> None:
        with _client(url) as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                outcomes[i] = o = send(c, shots[i], draft_id, n_ctx)
                if on_done is not None:
                    on_done(o)
    threads = [threading.Thread(target=worker, name=f"soak-client-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in outcomes if o is not None]


def alone(url: str, keys: dict[tuple, Shot], draft_id: str | None, n_ctx: int) -> dict[tuple, Outcome]:
    """Each distinct request sent alone, whole, on an otherwise idle server."""
    with _client(url) as c:
        return {k: send(c, shot.as_replay(), draft_id, n_ctx) for k, shot in keys.items()}


def quiesce(url: str, before: Scrape, sent: int, seconds: float) -> Scrape:
    """/metrics once the server has counted `sent` more /v1 requests and runs and queues nothing, or after
    `seconds`. A client that left is done before the server is: its handler notices within a poll, and the
    engine stops the generation at its next step."""
    deadline = time.monotonic() + seconds
    while True:
        now = scrape(url)
        counted = sum(v - before.get((n, labels), 0.0) for (n, labels), v in now.items()
                      if n == "tandem_requests_total" and dict(labels)["endpoint"].startswith("/v1/"))
        busy = delta({}, now, "tandem_requests_running") + delta({}, now, "tandem_queue_depth")
        if (counted >= sent and not busy) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def fill(url: str, opts: SoakOptions, draft_id: str | None) -> None:
    """Long requests on every sequence at once, with the draft and without: the largest batches the load can
    make, so that the allocator's high-water mark is reached before the baseline."""
    long = [Shot(i, "completion", False, i % 2, opts.ctx_size // 2, "named" if i % 2 else "none", None)
            for i in range(2 * opts.parallel)]
    run_load(url, long, opts.parallel, draft_id, opts.ctx_size)


def steady(pid: int, seconds: float) -> ProcSample:
    """The process's resources once its descriptors and threads held still for a second (the server closes the
    connections of clients that just left a moment later), or after `seconds`."""
    deadline = time.monotonic() + seconds
    last, since = ProcSample.of(pid), time.monotonic()
    while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = ProcSample.of(pid)
        if (now.fds, now.threads) != (last.fds, last.threads):
            since = time.monotonic()
        last = now
    return last


def settle(pid: int, baseline: ProcSample, seconds: float) -> ProcSample:
    """The process's resources once descriptors and threads are back to the baseline, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        now = ProcSample.of(pid)
        if (now.fds <= baseline.fds and now.threads <= baseline.threads) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


@dataclass
class SoakResult:
    """Everything one soak measured."""

    options: dict
    """The SoakOptions."""
    server: list[str]
    """The server's command line."""
    counts: dict[str, dict[str, int]]
    """By request kind: sent, greedy, seeded, completed, disconnected, abandoned, and errors by HTTP status."""
    statuses: dict[str, int]
    """Requests by HTTP status (lost: none)."""
    baseline: dict
    """The server's RSS, fds and threads after the warm-up."""
    after: dict
    """The same after the load."""
    rss_trace: list[list[int]]
    """[requests answered, RSS KiB] every --trace-every requests of the load."""
    seconds: float
    """Wall time of the load."""
    checks: list[dict]
    """Each Check: name, ok, detail."""

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def _paths(opts: SoakOptions) -> tuple[Path, Path]:
    if opts.tiny:
        fx = build_fixture_set(Path(opts.tiny))
        return Path(opts.model or fx["main"]), Path(opts.draft or fx["draft_close"])
    main = Path(opts.model) if opts.model else default_pair().main
    draft = Path(opts.draft) if opts.draft else draft_path()
    for flag, path in (("--model", main), ("--draft", draft)):
        if not path.is_file():
            raise BadInputError(f"{flag} {path} does not exist", f"pass an existing GGUF file to {flag}")
    return main, draft


def _check_options(opts: SoakOptions) -> None:
    for name in ("requests", "concurrency", "parallel", "ctx_size", "max_tokens", "trace_every"):
        if getattr(opts, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be at least 1", "pass a whole number >= 1")
    for name in ("bad_share", "disconnect_share"):
        if not 0 <= getattr(opts, name) <= 0.5:
            raise BadInputError(f"--{name.replace('_', '-')} must be between 0 and 0.5", "pass a share like 0.1")


def run_soak(opts: SoakOptions, log: Callable[[str], None] = lambda _s: None) -> SoakResult:
    """Start the server, warm it up, take the expected texts, run the load, and check everything."""
    _check_options(opts)
    main, draft = _paths(opts)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shots = make_plan(opts.requests, opts.seed, max_tokens=opts.max_tokens, bad_share=opts.bad_share,
                      disconnect_share=opts.disconnect_share, long_tokens=opts.ctx_size // 2)
    warm = make_plan(opts.warmup, opts.seed + 1, max_tokens=opts.max_tokens, bad_share=opts.bad_share,
                     disconnect_share=opts.disconnect_share, long_tokens=opts.ctx_size // 2)
    server = SoakServer(opts, main, draft, out.with_suffix(".server.log"))
    try:
        url = server.wait_ready()
        with _client(url) as c:
            draft_id = next(m["draft_model"] for m in c.get("/v1/models").json()["data"] if m["state"] == "loaded")
        n_ctx = opts.ctx_size
        log(f"server {url} (pid {server.pid}), draft {draft_id}; warm-up: {len(warm)} requests")
        run_load(url, warm, opts.concurrency, draft_id, n_ctx)
        fill(url, opts, draft_id)
        keys = {s.key: s for s in shots if s.compared}
        log(f"{len(keys)} distinct requests alone")
        expected = alone(url, keys, draft_id, n_ctx)
        baseline = steady(server.pid, opts.settle)
        before = scrape(url)
        log(f"baseline {baseline}; load: {len(shots)} requests from {opts.concurrency} clients, --parallel "
            f"{opts.parallel}")
        trace = [[0, baseline.rss_kib]]
        done = Counter[str]()

        def progress(o: Outcome) -> None:
            done[o.result] += 1
            n = sum(done.values())
            if n % opts.trace_every == 0:
                trace.append([n, ProcSample.of(server.pid).rss_kib])
                log(f"{n}/{len(shots)}: {dict(done)}, RSS {trace[-1][1] / 1024:.1f} MiB")
        t0 = time.perf_counter()
        outcomes = run_load(url, shots, opts.concurrency, draft_id, n_ctx, progress)
        seconds = time.perf_counter() - t0
        scraped = quiesce(url, before, len(shots), opts.settle)
        after = settle(server.pid, baseline, opts.settle)
        replayed = alone(url, keys, draft_id, n_ctx)
    finally:
        server.close()
    prompt_tokens = prompt_sizes(expected)
    checks: list[Check] = [*accounting(outcomes, len(shots)), *same_text(outcomes, expected, replayed),
                           *resources(baseline, after, opts.rss_growth if opts.rss_growth >= 0 else None),
                           *metrics(outcomes, before, scraped, prompt_tokens)]
    result = SoakResult(asdict(opts), server.cmd, _counts(outcomes), _statuses(outcomes), asdict(baseline),
                        asdict(after), trace, round(seconds, 2), [asdict(c) for c in checks])
    out.write_text(json.dumps(asdict(result), indent=1))
    return result


def _counts(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    rows: dict[str, Counter] = {}
    for o in outcomes:
        row = rows.setdefault(o.shot.kind, Counter())
        row["sent"] += 1
        row["greedy" if o.shot.seed is None else "seeded"] += 1
        row[o.result if o.result != "error" else f"HTTP {o.status}"] += 1
    return {k: dict(v) for k, v in sorted(rows.items())}


def _statuses(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(sorted(Counter(str(o.status) if o.status else "lost" for o in outcomes).items()))


def table(result: SoakResult) -> str:
    """The counts by kind, the resources, and the checks, as Markdown."""
    rows = ["| requests | sent | greedy | seeded | completed | client left | errors |",
            "|---|---:|---:|---:|---:|---:|---|"]
    total: Counter = Counter()
    for kind, c in result.counts.items():
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()) if k.startswith("HTTP"))
        others = ", ".join(f"{k}: {v}" for k, v in c.items() if k in ("lost", "incomplete", "malformed"))
        left = c.get("disconnected", 0) + c.get("abandoned", 0)
        rows.append(f"| {kind} | {c['sent']} | {c.get('greedy', 0)} | {c.get('seeded', 0)} | {c.get('completed', 0)} "
                    f"| {left} | {', '.join(x for x in (errors, others) if x) or '-'} |")
        total.update(c)
    errors = sum(v for k, v in total.items() if k.startswith("HTTP"))
    rows.append(f"| **all** | {total['sent']} | {total['greedy']} | {total['seeded']} | {total['completed']} | "
                f"{total['disconnected'] + total['abandoned']} | {errors} |")
    b, a = result.baseline, result.after
    peak = max([a["rss_kib"], *(r for _, r in result.rss_trace)])
    rows += ["", "| server process | after warm-up | after the load |", "|---|---:|---:|",
             f"| RSS MiB | {b['rss_kib'] / 1024:.1f} | {a['rss_kib'] / 1024:.1f} (peak {peak / 1024:.1f}) |",
             f"| open fds | {b['fds']} | {a['fds']} |", f"| threads | {b['threads']} | {a['threads']} |",
             "", "| check | | detail |", "|---|---|---|"]
    rows += [f"| {c['name']} | {'ok' if c['ok'] else '**FAILED**'} | {c['detail']} |" for c in result.checks]
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    opts = build(SoakOptions, args)
    result = run_soak(opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{opts.requests} requests, {opts.concurrency} clients, --parallel {opts.parallel}, seed {opts.seed}: "
          f"{result.seconds:.1f} s\n")
    print(table(result))
    print(f"\nwrote {opts.out}", file=sys.stderr)
    return 0 if result.ok else 1
