"""Several clients at once against the HTTP server: aggregate tokens per second and request latency.

For each concurrency N: a `tandem serve` (in this process, on loopback) with --parallel N and N × --ctx-size
positions, and N clients that each send one chat request (the bench prompts, cycled; --max-tokens greedy tokens)
at the same moment; with the draft (the configured speculation) and with draft_model "none". With --llama-server
PATH, llama-server -np N with the same model, context and threads, without and with the draft, takes the same
prompts (as token ids). Aggregate tok/s is every generated token over the wall time from the first request to the
last answer; latencies are per request, wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import httpx

from tandem.benchmarks.common import (add_concurrency_arguments, add_model_arguments, draft_file, load_prompts,
                                      one_main)
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.config import ModelOptions, SpecOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.serving import ServerThread

HELP = "several clients at once over HTTP: aggregate tok/s and latency by concurrency, vs llama-server -np N"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    add_concurrency_arguments(p, positions=512)
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server -np N at PATH, without and with the draft")


def _clients(n: int, send) -> tuple[float, list[float], int]:
    """Run send(i) -> tokens in n threads at once: (aggregate tok/s, latencies, tokens)."""
    latencies: list[float] = [0.0] * n
    tokens: list[int] = [0] * n

    def one(i: int) -> None:
        t0 = time.perf_counter()
        tokens[i] = send(i)
        latencies[i] = time.perf_counter() - t0
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0), latencies, sum(tokens)


def _row(name: str, n: int, result: tuple[float, list[float], int]) -> str:
    rate, lat, _ = result
    p95 = sorted(lat)[max(0, round(0.95 * len(lat)) - 1)]
    return f"| {n} | {name} | {rate:.1f} | {statistics.median(lat):.2f} | {p95:.2f} |"


def main(args: argparse.Namespace) -> int:
    main_path, draft = one_main(args), draft_file(args)
    texts = list(load_prompts(DATA / "bench_prompts.jsonl", None).values())
    print(f"main {main_path.name}, draft {draft.name}; {args.max_tokens} tokens a request, {args.ctx_size} positions "
          "each\n")
    print("| N | server | aggregate tok/s | p50 latency s | p95 latency s |")
    print("|---:|---|---:|---:|---:|", flush=True)
    for n in args.concurrency:
        opts = ModelOptions(model=str(main_path), draft=str(draft), ctx_size=args.ctx_size * n, parallel=n,
                            threads=args.threads)
        rt_holder: list[Runtime] = []

        def factory(opts=opts) -> Runtime:
            rt_holder.append(Runtime(opts, spec=SpecOptions(), announce=lambda _s: None))
            return rt_holder[-1]
        with ServerThread(create_app(ServerOptions(), factory, SpecOptions())) as srv:
            while httpx.get(f"{srv.url}/health").json()["status"] == "loading":
                time.sleep(0.1)
            for name, extra in (("tandem", {}), ("tandem --draft none", {"draft_model": "none"})):
                def send(i: int, extra=extra) -> int:
                    body = {"messages": [{"role": "user", "content": texts[i % len(texts)]}], "temperature": 0,
                            "max_tokens": args.max_tokens, "cache_prompt": False, **extra}
                    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=600)
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]
                print(_row(name, n, _clients(n, send)), flush=True)
            # the peer's prompts, tokenized while the runtime is loaded (the server frees it when it stops)
            prompts = [rt_holder[-1].prompt(text=texts[i % len(texts)]) for i in range(n)]
        if args.llama_server is None:
            continue
        for name, peer_draft in (("llama-server", None), ("llama-server + draft", draft)):
            peer = LlamaServerPeer(args.llama_server, PeerSettings(
                main=main_path, draft=peer_draft, ctx_size=args.ctx_size * n, threads=args.threads or 2,
                cache_type_k="f16", cache_type_v="f16", parallel=n, draft_max=16, draft_p_min=0.0))
            try:
                peer.start()
                print(_row(name, n, _clients(n, lambda i: peer.complete(prompts[i], args.max_tokens).tokens)),
                      flush=True)
            finally:
                peer.close()
    return 0
