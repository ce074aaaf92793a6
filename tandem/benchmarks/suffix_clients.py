"""`tandem bench suffix --clients N`: N agent traces at once over HTTP, Tandem against llama-server -np N.

Each client runs its own trace (tandem.benchmarks.suffix: a function written, then changed turn by turn, each answer
the whole function again), on a task of its own (another function), through /v1/chat/completions, greedy. Servers
run one after another in processes of their own on loopback with N sequences and N x --ctx-size positions: `tandem
serve` without speculation (--draft none), as configured (lookups and the suffix cache), and with --llama-server,
llama-server -np N without a draft and with --spec-type ngram-mod. Aggregate tok/s: every generated token over the
wall time from the first request to the last answer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx

from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.benchmarks.serve import _clients
from tandem.testing.serve_process import ServeProcess

TASKS = ("Write a Python function `summarize(orders)` that takes a list of dicts with keys 'customer', 'amount' and "
         "'status', and returns a dict mapping each customer to the total amount of their orders whose status is "
         "'paid'. Include a docstring. Reply with the complete function only.",
         "Write a Python function `count_words(lines)` that takes a list of strings and returns a dict mapping each "
         "lower-cased word to how often it occurs, ignoring punctuation. Include a docstring. Reply with the complete "
         "function only.",
         "Write a Python function `group_by_day(events)` that takes a list of dicts with keys 'name' and 'date' (an "
         "ISO date string) and returns a dict mapping each date to the list of event names on that day. Include a "
         "docstring. Reply with the complete function only.",
         "Write a Python function `top_scores(rows, n)` that takes a list of (player, score) tuples and returns the n "
         "players with the highest total score, as a list of (player, total). Include a docstring. Reply with the "
         "complete function only.")
CHANGES = ("Add type hints to the signature. Reply with the complete function only.",
           "Raise a ValueError with a clear message when the input is not a list. Reply with the complete function "
           "only.",
           "Rename the main variable to something clearer. Reply with the complete function only.",
           "Add a short example to the docstring. Reply with the complete function only.",
           "Make the function skip items that are None. Reply with the complete function only.")
SYSTEM = "You are a coding assistant. You answer with code only, no explanations."


def _trace(url: str, headers: dict, client: int, turns: int, max_tokens: int, model: str) -> int:
    """One client's trace; the tokens it was sent back."""
    messages = [{"role": "system", "content": SYSTEM}]
    total = 0
    with httpx.Client(timeout=900) as http:
        for ask in (TASKS[client % len(TASKS)], *CHANGES[:turns]):
            messages.append({"role": "user", "content": ask})
            r = http.post(f"{url}/v1/chat/completions", headers=headers,
                          json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            total += body["usage"]["completion_tokens"]
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return total


def clients_rate(url: str, n: int, turns: int, max_tokens: int, model: str = "") -> tuple[float, int, float]:
    """(aggregate tok/s, tokens, wall seconds) of n traces at once against the server at `url` (one per client, as
    `tandem bench serve` runs its clients); a client's failure is raised once every client is done."""
    tokens = [0] * n
    errors: list[Exception] = []

    def send(i: int) -> tuple[int, float]:
        try:
            tokens[i] = _trace(url, {}, i, turns, max_tokens, model)
        except Exception as e:  # noqa: BLE001 - raised below, after the other clients finish
            errors.append(e)
        return tokens[i], 0.0
    t0 = time.perf_counter()
    rate = _clients(n, send)[0]
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return rate, sum(tokens), wall


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, tuple[float, int, float]]:
    """Every server's (aggregate tok/s, tokens, seconds) at --clients N."""
    n, ctx = args.clients, args.ctx_size * args.clients
    out: dict[str, tuple[float, int, float]] = {}
    common = ["--model", str(args.model), "--parallel", str(n), "--ctx-size", str(ctx), "--threads",
              str(args.threads), "--port", "0"]
    sides = [("tandem-plain", [*common, "--draft", "none"]),
             ("tandem", [*common, *(["--draft", str(args.draft)] if args.draft else [])])]
    for name, argv in sides:
        server = ServeProcess(argv).start()
        try:
            log(f"{name} at {n} clients")
            out[name] = clients_rate(server.url, n, args.turns, args.trace_tokens)
        finally:
            server.stop()
        log(f"  {out[name][1]} tokens in {out[name][2]:.1f} s, {out[name][0]:.1f} tok/s")
    if args.llama_server:
        base = PeerSettings(main=args.model, ctx_size=ctx, threads=args.threads or 2, cache_type_k="f16",
                            cache_type_v="f16", parallel=n)
        for name, spec_type in (("llama-server", None), ("llama-server-ngram-mod", "ngram-mod")):
            peer = LlamaServerPeer(Path(args.llama_server), replace(base, spec_type=spec_type), name=name)
            try:
                peer.start()
                log(f"{name} -np {n}")
                out[name] = clients_rate(f"http://127.0.0.1:{peer.port}", n, args.turns, args.trace_tokens)
            finally:
                peer.close()
            log(f"  {out[name][1]} tokens in {out[name][2]:.1f} s, {out[name][0]:.1f} tok/s")
    return out


def markdown(results: dict[str, tuple[float, int, float]], n: int) -> str:
    plain = results["tandem-plain"][0]
    head = ["clients", *results, "Tandem / --draft none"]
    peers = [s for s in results if s.startswith("llama-server")]
    if peers:
        head.append("Tandem / llama-server best")
    row = [str(n), *(f"{r[0]:.1f}" for r in results.values()), f"{results['tandem'][0] / plain:.2f}x"]
    if peers:
        row.append(f"{results['tandem'][0] / max(results[p][0] for p in peers):.2f}x")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"])
