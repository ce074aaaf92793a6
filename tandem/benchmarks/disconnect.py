"""A client drops a long stream: how soon does the next request get its first token?

For each --parallel N and each server: `tandem serve --parallel N` in a process of its own (with its draft, and
the same requests with draft_model "none"), and with --llama-server PATH, llama-server -np N without and with the
draft (same model, threads and positions per request; its chat endpoint with the model's template). --reps times:
client A streams a long greedy answer (--long-tokens, ignore_eos) and closes its connection once --read-tokens
tokens have reached it; at that moment client B sends a short chat request (--max-tokens) and measures the time
to its first token. With one sequence (N = 1) B waits until the server notices A is gone and stops it; with
several, B's prompt joins the running batch. Prints a Markdown table of B's times (median and worst).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tandem.benchmarks.common import (add_model_arguments, draft_file, load_prompts, one_main, positive_int,
                                      tandem_server)
from tandem.benchmarks.peer import parallel_peer
from tandem.prompts import DATA

HELP = "a client drops a long stream: the next request's time to first token, vs llama-server"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--parallel", type=positive_int, nargs="+", default=[1, 4], help="N (default: 1 4)")
    p.add_argument("--reps", type=positive_int, default=5, help="drops per server (default: 5)")
    p.add_argument("--long-tokens", type=positive_int, default=1000,
                   help="tokens client A asks for (default: 1000)")
    p.add_argument("--read-tokens", type=positive_int, default=32,
                   help="tokens client A reads before it drops the stream (default: 32)")
    p.add_argument("--max-tokens", type=positive_int, default=8, help="tokens client B asks for (default: 8)")
    p.add_argument("--ctx-size", type=positive_int, default=2048,
                   help="positions per request (default: 2048)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server -np N at PATH, without and with the draft")


def _chat(url: str, text: str, max_tokens: int, extra: dict, *, drop_after: int | None = None) -> float:
    """Stream one greedy chat answer; seconds to its first token. With `drop_after`, close the connection once
    that many content chunks have arrived."""
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True, **extra}
    t0, first, seen = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if any(c.get("delta", {}).get("content") for c in json.loads(line[6:]).get("choices", [])):
                first = first if first is not None else time.perf_counter() - t0
                seen += 1
                if drop_after is not None and seen >= drop_after:
                    break  # leaving the block closes the connection
    return first if first is not None else time.perf_counter() - t0


def _drops(args: argparse.Namespace, url: str, texts: list[str], extra: dict) -> list[float]:
    """B's times to the first token, one per drop of A's stream."""
    out = []
    for rep in range(args.reps):
        _chat(url, texts[rep % len(texts)], args.long_tokens, {**extra, "ignore_eos": True},
              drop_after=args.read_tokens)
        out.append(_chat(url, texts[(rep + 1) % len(texts)], args.max_tokens, extra))
    return out


def _row(server: str, n: int, times: list[float]) -> str:
    return f"| {n} | {server} | {statistics.median(times):.3f} | {max(times):.3f} |"


def _tandem(args: argparse.Namespace, main_path: Path, draft: Path, n: int, rows: Callable[[str], None],
            texts: list[str]) -> None:
    with tandem_server(main_path, draft, threads=args.threads, ctx_size=args.ctx_size * n, parallel=n) as url:
        _chat(url, texts[0], 4, {})  # warm up: calibration and first-use costs are not a drop's
        for name, extra in (("tandem", {}), ("tandem --draft none", {"draft_model": "none"})):
            rows(_row(name, n, _drops(args, url, texts, {"cache_prompt": False, **extra})))


def _peer(args: argparse.Namespace, main_path: Path, draft: Path, n: int, rows: Callable[[str], None],
          texts: list[str]) -> None:
    for name, peer_draft in (("llama-server", None), ("llama-server + draft", draft)):
        peer = parallel_peer(args.llama_server, main_path, peer_draft, ctx_size=args.ctx_size * n,
                             threads=args.threads, parallel=n)
        try:
            peer.start()
            url = f"http://127.0.0.1:{peer.port}"
            _chat(url, texts[0], 4, {})
            rows(_row(name, n, _drops(args, url, texts, {"cache_prompt": False})))
        finally:
            peer.close()


def main(args: argparse.Namespace) -> int:
    main_path, draft = one_main(args), draft_file(args)
    texts = list(load_prompts(DATA / "bench_prompts.jsonl", None).values())
    print(f"main {main_path.name}, draft {draft.name}; A reads {args.read_tokens} of {args.long_tokens} tokens and "
          f"drops; B asks for {args.max_tokens}; {args.reps} drops per server\n")
    print("| N | server | B's first token, median s | worst s |")
    print("|---:|---|---:|---:|", flush=True)
    for n in args.parallel:
        _tandem(args, main_path, draft, n, lambda row: print(row, flush=True), texts)
        if args.llama_server is not None:
            _peer(args, main_path, draft, n, lambda row: print(row, flush=True), texts)
    return 0
