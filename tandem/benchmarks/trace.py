"""A server's lifetime: one client sends a fixed, seeded trace of requests to one `tandem serve` through the API.

The trace (--requests, default 60) mixes the bench, development and held-out prompts, answer lengths from 8 to
300 tokens, greedy and seeded requests, and in its middle a pathological stretch (--bad, default 6 requests) at
temperature 2, where the draft's samples are almost never the main model's, so its drafts fail. Each request is
sent twice in a row to the same server, as the user's default (the configured draft) and with draft_model "none",
so both see the same moments of a noisy machine; the server keeps its draft policy's state across the whole trace,
as a real server does. Decode time is each response's timings.predicted_ms.

After the trace, --fresh N of the requests that came after the pathological stretch run again, each as the first
request of a freshly started server: a request late in a server's life must draft about as much as it does there.
With --llama-server PATH, llama-server (without and with the same draft, up to 16 tokens whatever their
confidence) takes the same trace (the prompts as the server renders them, greedy where Tandem's was greedy, the same
seed otherwise), one server after the other.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import httpx

from tandem.benchmarks.common import add_model_arguments, draft_file, load_prompts, one_main, positive_int, tandem_server
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.engine.llama import Model
from tandem.prompts import DATA
from tandem.runtime import tokenize_prompt

HELP = "a server's lifetime: a seeded trace of 60 mixed requests with a pathological stretch, vs --draft none"
"""One line for `tandem bench trace`."""

LENGTHS = (8, 16, 32, 64, 120, 200, 300)
"""Answer lengths the trace draws from."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace."""

    index: int
    prompt: str
    max_tokens: int
    seed: int | None
    """None: greedy; else sampled at `temperature` with this seed."""
    temperature: float = 0.0
    bad: bool = False
    """Part of the pathological stretch."""

    def body(self, **extra) -> dict:
        b = {"messages": [{"role": "user", "content": self.prompt}], "max_tokens": self.max_tokens,
             "temperature": self.temperature, "cache_prompt": False, **extra}
        return b if self.seed is None else {**b, "seed": self.seed}


def make_trace(n: int, bad: int, seed: int = 0) -> list[TraceRequest]:
    """The fixed trace: n requests, the pathological stretch of `bad` in the middle."""
    rng = random.Random(seed)
    prompts = [p for f in ("bench_prompts.jsonl", "dev_prompts.jsonl", "heldout_prompts.jsonl")
               for p in load_prompts(DATA / f, None).values()]
    start = (n - bad) // 2
    out = []
    for i in range(n):
        prompt, length = rng.choice(prompts), rng.choice(LENGTHS)
        if start <= i < start + bad:
            out.append(TraceRequest(i, prompt, max(length, 64), 1000 + i, 2.0, bad=True))
        elif rng.random() < 0.3:
            out.append(TraceRequest(i, prompt, length, 1000 + i, 0.7))
        else:
            out.append(TraceRequest(i, prompt, length, None))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--requests", type=positive_int, default=60, help="requests in the trace (default: 60)")
    p.add_argument("--bad", type=int, default=6, help="requests in the pathological stretch (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="the trace's seed (default: 0)")
    p.add_argument("--ctx-size", type=positive_int, default=4096, help="tandem serve --ctx-size (default: 4096)")
    p.add_argument("--fresh", type=int, default=4, metavar="N",
                   help="requests after the stretch to rerun each on a fresh server (default: 4)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server at PATH, without and with the draft, on the same trace")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every response's numbers")


def _chat(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    out = r.json()
    return {"ms": out["timings"]["predicted_ms"], "n": out["timings"]["predicted_n"],
            "drafted": out["stats"]["total_draft_tokens_count"], "accepted": out["stats"]["accepted_draft_tokens_count"],
            "draft_steps": out["stats"].get("draft_steps", 0), "text": out["choices"][0]["message"]["content"]}


def _serve(args: argparse.Namespace, main_path: Path, draft: Path):
    return tandem_server(main_path, draft, threads=args.threads, ctx_size=args.ctx_size, parallel=1)


def main(args: argparse.Namespace) -> int:
    main_path, draft = one_main(args), draft_file(args)
    trace = make_trace(args.requests, args.bad, args.seed)
    stretch_end = max((t.index for t in trace if t.bad), default=-1)
    print(f"main {main_path.name}, draft {draft.name}; {len(trace)} requests, {args.bad} pathological "
          f"(temperature 2) from request {min((t.index for t in trace if t.bad), default=0)}\n", flush=True)
    rows: list[dict] = []
    with _serve(args, main_path, draft) as url:
        for t in trace:
            spec, plain = _chat(url, t.body()), _chat(url, t.body(draft_model="none"))
            rows.append({"i": t.index, "bad": t.bad, "max_tokens": t.max_tokens, "seed": t.seed, "spec": spec,
                         "plain": plain, "same_text": spec["text"] == plain["text"]})
            print(f"  {t.index:2d} {'bad ' if t.bad else ''}{t.max_tokens:3d} tok {'seeded' if t.seed else 'greedy'}: "
                  f"{spec['n'] / max(spec['ms'], 1e-9) * 1000:6.1f} tok/s vs {plain['n'] / max(plain['ms'], 1e-9) * 1000:6.1f}"
                  f" plain; drafted {spec['drafted']}, accepted {spec['accepted']}", flush=True)
        rendered = {t.index: httpx.post(f"{url}/apply-template", timeout=60,
                                        json={"messages": t.body()["messages"]}).json()["prompt"] for t in trace}
    spec_ms = sum(r["spec"]["ms"] for r in rows)
    plain_ms = sum(r["plain"]["ms"] for r in rows)
    spec_n = sum(r["spec"]["n"] for r in rows)
    plain_n = sum(r["plain"]["n"] for r in rows)
    print("\n| server | tokens | decode s | tok/s | vs Tandem --draft none |")
    print("|---|---:|---:|---:|---:|")
    print(f"| Tandem (default) | {spec_n} | {spec_ms / 1000:.1f} | {spec_n / spec_ms * 1000:.1f} | "
          f"{(spec_n / spec_ms) / (plain_n / plain_ms):.2f}x |")
    print(f"| Tandem --draft none | {plain_n} | {plain_ms / 1000:.1f} | {plain_n / plain_ms * 1000:.1f} | 1.00x |")
    if args.llama_server is not None:
        vocab = Model(main_path)
        for name, peer_draft in (("llama-server", None), ("llama-server + draft", draft)):
            peer = LlamaServerPeer(args.llama_server, PeerSettings(
                main=main_path, draft=peer_draft, ctx_size=args.ctx_size, threads=args.threads or 2,
                cache_type_k="f16", cache_type_v="f16", draft_max=16, draft_p_min=0.0), name=name)
            try:
                peer.start()
                n = ms = 0.0
                for t in trace:
                    res = peer.complete(tokenize_prompt(vocab, rendered[t.index]), t.max_tokens,
                                        **({} if t.seed is None else {"temperature": t.temperature, "seed": t.seed}))
                    n, ms = n + res.tokens, ms + res.seconds * 1000
            finally:
                peer.close()
            print(f"| {name} | {int(n)} | {ms / 1000:.1f} | {n / ms * 1000:.1f} | "
                  f"{(n / ms) / (plain_n / plain_ms):.2f}x |", flush=True)
    greedy = [r for r in rows if r["seed"] is None]
    print(f"\ngreedy requests with the same text as draft_model \"none\": {sum(r['same_text'] for r in greedy)}/"
          f"{len(greedy)}")
    after = [r for r in rows if r["i"] > stretch_end and r["seed"] is None and r["max_tokens"] >= 64][:args.fresh]
    if after:
        print("\n| request after the stretch | drafted: trace | fresh server | accepted: trace | fresh server |")
        print("|---:|---:|---:|---:|---:|")
        for r in after:
            with _serve(args, main_path, draft) as url:
                fresh = _chat(url, trace[r["i"]].body())
            r["fresh"] = fresh
            print(f"| {r['i']} | {r['spec']['drafted']} | {fresh['drafted']} | {r['spec']['accepted']} | "
                  f"{fresh['accepted']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0

