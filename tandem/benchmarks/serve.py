"""Several clients at once against the HTTP server: aggregate tokens per second and request latency.

For each concurrency N: `tandem serve` in a process of its own (as a user runs it, and as the peer runs: the
clients' threads do not share its interpreter), on loopback, with --parallel N and N × --ctx-size positions, and N
clients that each send one chat request (the bench prompts, cycled; --max-tokens greedy tokens) at the same moment,
or --rounds of them one after another; with the draft (the configured speculation) and with draft_model "none". With --llama-server
PATH, llama-server -np N with the same model, context and threads, without and with the draft, takes the same
prompts (as token ids). Aggregate tok/s is every generated token over the wall time from the first request to the
last answer; latencies and times to the first token are per request, wall clock, as a streaming client sees them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from tandem.benchmarks.common import (add_concurrency_arguments, add_model_arguments, draft_file, load_prompts,
                                      one_main, positive_int, tandem_server)
from tandem.benchmarks.peer import parallel_peer
from tandem.engine.llama import Model
from tandem.prompts import DATA
from tandem.runtime import tokenize_prompt

HELP = "several clients at once over HTTP: aggregate tok/s and latency by concurrency, vs llama-server -np N"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    add_concurrency_arguments(p, positions=512)
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server -np N at PATH, without and with the draft, and with ngram-mod")
    p.add_argument("--peer-draft", type=Path, default=None, metavar="PATH",
                   help="the draft llama-server uses (default: --draft; llama-server cannot draft across "
                        "vocabularies, so give a draft of the main model's own for a draft of another vocabulary)")
    p.add_argument("--also-parallel", type=int, default=None, metavar="P",
                   help="also run Tandem with --parallel P (P x positions in one pool) at every N: a single client "
                        "at N = 1 shows what serving several clients costs one")
    p.add_argument("--rounds", type=positive_int, default=1, metavar="R",
                   help="requests each client sends one after another (default: 1); several show what the requests "
                        "a server keeps for their prefix cost the next ones")


def _clients(n: int, send, rounds: int = 1) -> tuple[float, list[float], list[float]]:
    """Run send(j) -> (tokens, seconds to the first token) in n threads at once, client i sending requests j = i,
    i + n, ... (`rounds` of them) one after another: (aggregate tok/s, latencies, times to the first token)."""
    latencies: list[float] = [0.0] * (n * rounds)
    firsts: list[float] = [0.0] * (n * rounds)
    tokens: list[int] = [0] * (n * rounds)

    def one(i: int) -> None:
        for j in range(i, n * rounds, n):
            t0 = time.perf_counter()
            tokens[j], firsts[j] = send(j)
            latencies[j] = time.perf_counter() - t0
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0), latencies, firsts


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def _row(name: str, n: int, result: tuple[float, list[float], list[float]]) -> str:
    rate, lat, first = result
    return (f"| {n} | {name} | {rate:.1f} | {statistics.median(lat):.2f} | {_p95(lat):.2f} | "
            f"{statistics.median(first):.2f} | {_p95(first):.2f} |")


def _stream_chat(url: str, body: dict) -> tuple[int, float]:
    """One streamed chat request: (completion tokens, seconds to the first content)."""
    t0, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=600,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - t0


def _tandem_rows(args: argparse.Namespace, main_path: Path, draft: Path, texts: list[str], n: int, parallel: int,
                 suffix: str) -> list[str]:
    """Print Tandem's rows for n clients, with and without its draft, served with --parallel `parallel`; return
    the clients' prompts as the server renders them (for the peer, which takes token ids)."""
    with tandem_server(main_path, draft, threads=args.threads, ctx_size=args.ctx_size * parallel,
                       parallel=parallel) as url:
        for name, extra in ((f"tandem{suffix}", {}), (f"tandem{suffix} --draft none", {"draft_model": "none"})):
            def send(i: int, extra=extra) -> tuple[int, float]:
                return _stream_chat(url, {"messages": [{"role": "user", "content": texts[i % len(texts)]}],
                                          "temperature": 0, "max_tokens": args.max_tokens, "cache_prompt": False,
                                          **extra})
            print(_row(name, n, _clients(n, send, args.rounds)), flush=True)
        return [httpx.post(f"{url}/apply-template", timeout=60,
                           json={"messages": [{"role": "user", "content": texts[i % len(texts)]}]}).json()["prompt"]
                for i in range(n * args.rounds)]


def main(args: argparse.Namespace) -> int:
    main_path, draft = one_main(args), draft_file(args)
    texts = list(load_prompts(DATA / "bench_prompts.jsonl", None).values())
    print(f"main {main_path.name}, draft {draft.name}; {args.max_tokens} tokens a request, {args.ctx_size} positions "
          "each\n")
    print("| N | server | aggregate tok/s | p50 latency s | p95 latency s | p50 first token s | p95 first token s |")
    print("|---:|---|---:|---:|---:|---:|---:|", flush=True)
    vocab: Model | None = None  # the main model's tokenizer, for the peer's token ids
    for n in args.concurrency:
        rendered: list[str] = []
        for parallel in dict.fromkeys([n] + ([args.also_parallel] if args.also_parallel else [])):
            suffix = "" if parallel == n else f" --parallel {parallel}"
            rendered = _tandem_rows(args, main_path, draft, texts, n, parallel, suffix)
        if args.llama_server is None:
            continue
        vocab = vocab or Model(main_path)
        prompts = [tokenize_prompt(vocab, text) for text in rendered]
        peers = (("llama-server", None, None), ("llama-server + draft", args.peer_draft or draft, None),
                 ("llama-server ngram-mod", None, "ngram-mod"))
        for name, peer_draft, spec_type in peers:
            peer = parallel_peer(args.llama_server, main_path, peer_draft, ctx_size=args.ctx_size * n,
                                 threads=args.threads, parallel=n, spec_type=spec_type)
            try:
                peer.start()
                print(_row(name, n, _clients(n, lambda i: peer.stream(prompts[i], args.max_tokens), args.rounds)),
                      flush=True)
            finally:
                peer.close()
    return 0
