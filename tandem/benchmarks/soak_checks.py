"""What the soak (tandem bench soak) checks once the traffic is over: the client's accounting of every request,
deterministic outputs against the same requests sent alone, the server process's memory, descriptors and
threads (from /proc), and /metrics against the client's counts."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.benchmarks.soak_plan import ABANDON, DISCONNECT, Outcome


@dataclass(frozen=True)
class ProcSample:
    """A process's resources at one moment, from /proc/PID."""

    rss_kib: int
    """Resident memory (VmRSS), KiB."""
    fds: int
    """Open file descriptors (entries of /proc/PID/fd)."""
    threads: int
    """Threads (entries of /proc/PID/task)."""

    @classmethod
    def of(cls, pid: int) -> ProcSample:
        proc = Path(f"/proc/{pid}")
        rss = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return cls(rss, len(os.listdir(proc / "fd")), len(os.listdir(proc / "task")))


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Scrape:
    """Every sample of GET /metrics by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a sample (name with exactly these labels) grew; with no labels, the sum over every label set."""
    def total(s: Scrape) -> float:
        if labels:
            return s.get((name, tuple(sorted(labels.items()))), 0.0)
        return sum(v for (n, _), v in s.items() if n == name)
    return total(after) - total(before)


@dataclass(frozen=True)
class Check:
    """One verdict of the soak."""

    name: str
    """What is checked."""
    ok: bool
    """Whether it held."""
    detail: str
    """The numbers behind it, or the first failures."""


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def accounting(outcomes: list[Outcome], sent: int) -> list[Check]:
    """Every request answered once: a complete answer, a typed error, or a disconnect the client chose."""
    answered = ("completed", "error", "disconnected", "abandoned")
    by_result = Counter(o.result for o in outcomes)
    indices = Counter(o.shot.index for o in outcomes)
    dup_ids = [i for i, n in Counter(o.response_id for o in outcomes if o.response_id).items() if n > 1]
    problems = [f"#{o.shot.index} {o.shot.kind}: {o.result} {o.detail}" for o in outcomes
                if o.result not in answered]
    wrong = []
    for o in outcomes:
        expected = o.shot.fault_status
        if o.shot.well_formed and o.result == "error":
            wrong.append(f"#{o.shot.index} {o.shot.kind}: HTTP {o.status} {o.error.get('message', '')[:100]}")
        elif not o.shot.well_formed and (o.result != "error" or o.status != expected
                                         or o.error.get("param") != o.shot.fault_param):
            wrong.append(f"#{o.shot.index} {o.shot.kind}: HTTP {o.status} ({o.result}, param "
                         f"{o.error.get('param')!r}), expected {expected} (param {o.shot.fault_param!r})")
        elif (o.result == "disconnected" and o.shot.fault != DISCONNECT) or (
                o.result == "abandoned" and o.shot.fault != ABANDON):
            wrong.append(f"#{o.shot.index}: {o.result} without being asked to")
    counted = sum(by_result[r] for r in answered)
    return [
        Check("every request answered once", len(outcomes) == sent and set(indices) == set(range(sent))
              and max(indices.values(), default=1) == 1 and counted == sent and not dup_ids,
              f"sent {sent}, completed {by_result['completed']}, errors {by_result['error']}, disconnected "
              f"{by_result['disconnected']}, abandoned {by_result['abandoned']}"
              + (f"; duplicate response ids {dup_ids[:3]}" if dup_ids else "")),
        Check("no lost, incomplete or malformed answers", not problems, _first(problems) or "none"),
        Check("well-formed requests complete, bad ones get their typed 4xx naming the field", not wrong,
              _first(wrong) or "all"),
    ]


def same_text(outcomes: list[Outcome], expected: dict[tuple, Outcome], replayed: dict[tuple, Outcome]) -> list[Check]:
    """Deterministic requests (greedy or seeded) under load give what they give alone, before and after."""
    diffs, n_greedy, n_seeded = [], 0, 0
    for o in outcomes:
        if o.result != "completed" or not o.shot.compared:
            continue
        e = expected.get(o.shot.key)
        if e is None or e.result != "completed":
            diffs.append(f"#{o.shot.index}: no answer alone to compare with")
        elif o.text != e.text or o.completion_tokens != e.completion_tokens:
            diffs.append(f"#{o.shot.index} {o.shot.kind} {o.shot.key}: {o.text[:40]!r} vs alone {e.text[:40]!r}")
        n_greedy += o.shot.seed is None
        n_seeded += o.shot.seed is not None
    drift = [f"{k}: {expected[k].text[:40]!r} before, {r.text[:40]!r} after" for k, r in replayed.items()
             if k in expected and (r.result != "completed" or r.text != expected[k].text)]
    return [Check("greedy and seeded texts under load equal the request alone", not diffs,
                  _first(diffs) or f"{n_greedy} greedy and {n_seeded} seeded answers, {len(expected)} distinct"),
            Check("alone, the same texts after the load as before", not drift,
                  _first(drift) or f"{len(replayed)} distinct requests replayed")]


def resources(baseline: ProcSample, after: ProcSample, rss_growth: float | None) -> list[Check]:
    """Descriptors and threads back to their baseline; RSS grown less than `rss_growth` (None: not checked)."""
    checks = [Check("open fds back to baseline", after.fds <= baseline.fds, f"{baseline.fds} -> {after.fds}"),
              Check("threads back to baseline", after.threads <= baseline.threads,
                    f"{baseline.threads} -> {after.threads}")]
    if rss_growth is not None:
        growth = after.rss_kib / baseline.rss_kib - 1
        checks.append(Check(f"RSS grew less than {rss_growth:.0%}", growth < rss_growth,
                            f"{baseline.rss_kib / 1024:.1f} -> {after.rss_kib / 1024:.1f} MiB ({growth:+.1%})"))
    return checks


def _requests(outcomes: list[Outcome], before: Scrape, after: Scrape) -> Check:
    """tandem_requests_total against the client's statuses. An abandoned request is counted by the server as 499
    (it saw the client leave) or 200 (its answer was ready first): those two are compared together."""
    client = Counter((o.path, str(o.status)) for o in outcomes if o.status is not None)
    for o in outcomes:
        if o.result == "abandoned":
            client[(o.path, "200|499")] += 1
    server = {(dict(labels)["endpoint"], dict(labels)["status"]): v - before.get((n, labels), 0.0)
              for (n, labels), v in after.items() if n == "tandem_requests_total"}
    server = Counter({k: int(v) for k, v in server.items() if v and k[0].startswith("/v1/")})
    for path in {p for p, _ in server}:
        server[(path, "200|499")] = server.pop((path, "499"), 0)
        client[(path, "200|499")] += client.pop((path, "200"), 0)
        server[(path, "200|499")] += server.pop((path, "200"), 0)
    keys = sorted(k for k in set(client) | set(server) if client[k] or server[k])
    mismatch = [f"{ep} {st}: server {server[(ep, st)]}, client {client[(ep, st)]}" for ep, st in keys
                if server[(ep, st)] != client[(ep, st)]]
    return Check("tandem_requests_total by endpoint and status = the client's", not mismatch,
                 _first(mismatch) or ", ".join(f"{ep} {st}: {server[(ep, st)]}" for ep, st in keys))


def metrics(outcomes: list[Outcome], before: Scrape, after: Scrape, prompt_tokens: dict[tuple, int]) -> list[Check]:
    """/metrics against the client's counts (`prompt_tokens`: by (endpoint, prompt index), from answers alone)."""
    completed = [o for o in outcomes if o.result == "completed"]
    cut = [o for o in outcomes if o.result == "disconnected"]
    gone = [o for o in outcomes if o.result == "abandoned"]  # generated in part, or not at all (left while queued)
    generations = delta(before, after, "tandem_generations_total")
    cancelled = delta(before, after, "tandem_generations_total", stop_reason="cancelled")
    gen_tokens = delta(before, after, "tandem_generated_tokens_total")
    low = sum(o.completion_tokens for o in completed) + sum(o.chunks for o in cut)
    high = sum(o.completion_tokens for o in completed) + sum(o.shot.max_tokens for o in cut + gone)
    unknown = [o for o in completed + cut + gone if (o.shot.endpoint, o.shot.prompt) not in prompt_tokens]
    want = sum(prompt_tokens.get((o.shot.endpoint, o.shot.prompt), 0) for o in completed + cut)
    extra = sum(prompt_tokens.get((o.shot.endpoint, o.shot.prompt), 0) for o in gone)
    got_prompt = delta(before, after, "tandem_prompt_tokens_total")
    idle = {name: after.get((name, ()), 0.0) for name in ("tandem_queue_depth", "tandem_requests_running")}
    return [
        _requests(outcomes, before, after),
        Check("tandem_generations_total = completed + disconnected (+ abandoned ones that started); cancelled <= "
              "disconnected + abandoned",
              len(completed) + len(cut) <= generations <= len(completed) + len(cut) + len(gone)
              and cancelled <= len(cut) + len(gone),
              f"generations {generations:.0f} (cancelled {cancelled:.0f}); completed {len(completed)}, "
              f"disconnected {len(cut)}, abandoned {len(gone)}"),
        Check("tandem_generated_tokens_total within the client's count", low <= gen_tokens <= high,
              f"server {gen_tokens:.0f}; client {low}..{high}"),
        Check("tandem_prompt_tokens_total = the answers' prompt tokens", want <= got_prompt <= want + extra
              and not unknown, f"server {got_prompt:.0f}, client {want}" + (f"..{want + extra}" if extra else "")),
        Check("queue empty and nothing running afterwards", not any(idle.values()),
              ", ".join(f"{k} {v:.0f}" for k, v in idle.items())),
    ]


def prompt_sizes(expected: dict[tuple, Outcome]) -> dict[tuple[str, int], int]:
    """Prompt tokens by (endpoint, prompt index), from the answers alone (keys: Shot.key)."""
    return {(k[0], k[1]): o.prompt_tokens for k, o in expected.items() if o.result == "completed"}
