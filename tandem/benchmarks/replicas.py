"""Tandem replicas on Ray Serve (`tandem serve --replicas N`) against one Tandem process, and what prefix-affinity
routing buys a multi-turn conversation. Needs Ray Serve (pip install 'tandem[ray]').

1. Throughput: --replicas replicas of --replica-threads threads each, against one Tandem of replicas × threads
   threads, at each --concurrency N: N clients send one streamed chat request each (distinct bench prompts,
   --max-tokens greedy tokens, no prompt cache) at the same moment. Aggregate tok/s is every generated token over
   the wall time from the first request to the last answer; latencies are per request, as a client sees them.
   Each server runs --parallel (the most clients a replica gets) so that requests batch alike.
2. Multi-turn: --conversations conversations of --turns turns each, taken in turn (turn 1 of each, then turn 2 of
   each...), over the replicas with prefix-affinity routing and with Ray's default power-of-two routing; each
   replica holds --parallel sequences' KV cells. The time to the first token of each turn, as a streaming client
   sees it, and the prompt tokens the replica reused (usage.prompt_tokens_details.cached_tokens).
Every server is a `tandem serve` child process, started and stopped here, Ray included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from tandem.benchmarks.common import add_model_arguments, draft_file, load_prompts, one_main, positive_int
from tandem.benchmarks.serve import _clients, _p95, _row
from tandem.prompts import DATA
from tandem.testing.serve_process import ServeProcess

HELP = "Ray Serve replicas vs one Tandem (tok/s, p95) and multi-turn TTFT with and without prefix affinity"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--replicas", type=positive_int, default=2, help="Tandem replicas (default: 2)")
    p.add_argument("--replica-threads", type=positive_int, default=1, help="threads per replica (default: 1)")
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[4, 8], help="N clients (default: 4 8)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per request (default: 64)")
    p.add_argument("--turns", type=positive_int, default=8, help="turns per conversation (default: 8)")
    p.add_argument("--conversations", type=positive_int, default=8, help="conversations (default: 8)")
    p.add_argument("--turn-tokens", type=positive_int, default=32, help="tokens per reply in the multi-turn part "
                   "(default: 32)")
    p.add_argument("--skip", choices=("throughput", "turns"), default=None, help="leave one part out")


def _stream(url: str, body: dict) -> tuple[int, float, str, int, str]:
    """One streamed chat request: (completion tokens, seconds to the first content, text, cached prompt tokens,
    replica)."""
    t0, first, tokens, cached, parts = time.perf_counter(), None, 0, 0, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=600,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        replica = r.headers.get("x-tandem-replica", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                text = c.get("delta", {}).get("content")
                if text:
                    first = first if first is not None else time.perf_counter() - t0
                    parts.append(text)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return tokens, first if first is not None else time.perf_counter() - t0, "".join(parts), cached, replica


def _server(models: list[str], *extra: str) -> ServeProcess:
    return ServeProcess([*models, "--port", "0", *extra]).start()


def _throughput(args: argparse.Namespace, models: list[str], texts: list[str]) -> None:
    most = max(args.concurrency)
    per = max(1, -(-most // args.replicas))
    servers = {
        f"{args.replicas} replicas x {args.replica_threads} thread": (
            "--replicas", str(args.replicas), "--threads", str(args.replica_threads), "--replica-cpus",
            str(args.replica_threads), "--parallel", str(per), "--ctx-size", str(512 * per),
            "--max-ongoing-requests", str(per)),
        f"1 Tandem x {args.replicas * args.replica_threads} threads": (
            "--threads", str(args.replicas * args.replica_threads), "--parallel", str(most),
            "--ctx-size", str(512 * most)),
    }
    print("| N | server | aggregate tok/s | p50 latency s | p95 latency s | p50 first token s | p95 first token s |")
    print("|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for name, extra in servers.items():
        srv = _server(models, *extra)
        try:
            for n in args.concurrency:
                def send(i: int) -> tuple[int, float]:
                    body = {"messages": [{"role": "user", "content": f"({i}) {texts[i % len(texts)]}"}],
                            "temperature": 0, "max_tokens": args.max_tokens, "cache_prompt": False}
                    return _stream(srv.url, body)[:2]
                print(_row(name, n, _clients(n, send)), flush=True)
        finally:
            srv.stop()


def _turns(args: argparse.Namespace, models: list[str], texts: list[str]) -> dict[str, list[float]]:
    per = max(1, -(-args.conversations // args.replicas))
    ctx = per * (args.turns * (args.turn_tokens + 160) + 256)
    results: dict[str, list[float]] = {}
    for name, flag in (("prefix affinity", "--affinity"), ("power-of-two (Ray's default)", "--no-affinity")):
        srv = _server(models, "--replicas", str(args.replicas), "--threads", str(args.replica_threads),
                      "--replica-cpus", str(args.replica_threads), "--parallel", str(per), "--ctx-size", str(ctx),
                      flag)
        try:
            convs = [[{"role": "user", "content": f"Conversation {c}. {texts[c % len(texts)]}"}]
                     for c in range(args.conversations)]
            firsts: list[list[float]] = [[] for _ in range(args.turns)]
            cached: list[list[int]] = [[] for _ in range(args.turns)]
            for t in range(args.turns):
                for c, conv in enumerate(convs):
                    _, first, text, reused, _ = _stream(srv.url, {"messages": conv, "temperature": 0,
                                                                  "max_tokens": args.turn_tokens})
                    firsts[t].append(first)
                    cached[t].append(reused)
                    conv += [{"role": "assistant", "content": text},
                             {"role": "user", "content": f"Turn {t + 2}: {texts[(c + t + 1) % len(texts)][:300]}"}]
            results[name] = [statistics.mean(f) for f in firsts]
            print(f"\n{name}: mean time to the first token by turn (s), and prompt tokens reused")
            print("| turn | " + " | ".join(str(t + 1) for t in range(args.turns)) + " |")
            print("|---|" + "---:|" * args.turns)
            print("| TTFT s | " + " | ".join(f"{statistics.mean(f):.3f}" for f in firsts) + " |")
            print("| cached tokens | " + " | ".join(f"{statistics.mean(c):.0f}" for c in cached) + " |", flush=True)
        finally:
            srv.stop()
    return results


def main(args: argparse.Namespace) -> int:
    models = ["--model", str(one_main(args)), "--draft", str(draft_file(args))]
    texts = list(load_prompts(DATA / "bench_prompts.jsonl", None).values())
    print(f"main {models[1]}, draft {models[3]}; {args.replicas} replicas x {args.replica_threads} thread(s)\n")
    if args.skip != "throughput":
        _throughput(args, models, texts)
    if args.skip != "turns":
        res = _turns(args, models, texts)
        a, b = res["prefix affinity"][-1], res["power-of-two (Ray's default)"][-1]
        print(f"\nturn {args.turns}: prefix affinity {a:.3f} s vs power-of-two {b:.3f} s to the first token "
              f"({b / a:.1f}x)")
    return 0
