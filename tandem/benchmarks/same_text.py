"""Does anything but the main model change greedy text? `tandem serve` as a user starts it, per main model.

For each main model: `tandem serve --model MAIN --draft DRAFT` with no other flag ("defaults"), then with
speculation forced at every step ("draft-model": --draft-policy fixed --no-pause-slow-draft, since the defaults
draft little where the draft cannot pay; "ngram": --spec-type ngram --draft-policy fixed). On each server every
held-out prompt is asked greedily with draft_model "none" (what --draft none gives) and with the server's
speculation, one request at a time; then --concurrency of them at once, with speculation. Counted: texts equal to
draft_model "none" alone, and the tokens drafted (each response's stats), so an equality is never one that
nothing was drafted for. /health's exactness regime is printed with each server.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx

from tandem.benchmarks.common import add_model_arguments, draft_file, load_prompts, mains, positive_int
from tandem.prompts import DATA
from tandem.testing.serve import ServeProcess

HELP = "greedy text with drafts, and among concurrent requests, vs draft_model none alone, via tandem serve"
"""One line for `tandem bench --help`."""

SERVERS = {"defaults": [],
           "draft-model": ["--draft-policy", "fixed", "--no-pause-slow-draft"],
           "ngram": ["--spec-type", "ngram", "--draft-policy", "fixed"]}
"""Server flags per row, beyond --model and --draft."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, ("q8_0", "q4_k_m"))
    p.add_argument("--max-tokens", type=positive_int, default=120, metavar="N",
                   help="greedy tokens per request (default: 120)")
    p.add_argument("--concurrency", type=positive_int, default=4, metavar="N",
                   help="requests sent at once in the concurrent round (default: 4)")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS),
                   help="which server settings to run (default: all)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every text and count")


def _chat(url: str, text: str, tokens: int, draft: str | None) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": tokens}
    if draft is not None:
        body["draft_model"] = draft
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1800)
    r.raise_for_status()
    out = r.json()
    return {"text": out["choices"][0]["message"]["content"], "drafted": out["stats"]["total_draft_tokens_count"]}


def _at_once(url: str, texts: list[str], tokens: int) -> list[dict]:
    out: list[dict] = [{}] * len(texts)
    start = threading.Barrier(len(texts))

    def one(i: int) -> None:
        start.wait()
        out[i] = _chat(url, texts[i], tokens, None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def one_server(main: Path, draft: Path, flags: list[str], prompts: list[str], args: argparse.Namespace) -> dict:
    cmd = ["--model", str(main), "--draft", str(draft), "--port", "0", *flags]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = ServeProcess(cmd).start(timeout=600)
    try:
        url = server.url
        while (health := httpx.get(f"{url}/health", timeout=60).json())["status"] == "loading":
            time.sleep(0.2)
        inv = (health.get("model") or {}).get("invariance") or {}
        plain = [_chat(url, t, args.max_tokens, "none") for t in prompts]
        spec = [_chat(url, t, args.max_tokens, None) for t in prompts]
        crowd = _at_once(url, prompts[:args.concurrency], args.max_tokens)
    finally:
        server.stop()
    return {"regime": inv.get("regime"), "regime_why": inv.get("regime_why"),
            "alone_same": sum(a["text"] == b["text"] for a, b in zip(plain, spec)), "alone_n": len(prompts),
            "alone_drafted": sum(s["drafted"] for s in spec),
            "crowd_same": sum(a["text"] == b["text"] for a, b in zip(plain, crowd)), "crowd_n": len(crowd),
            "crowd_drafted": sum(c["drafted"] for c in crowd),
            "plain": [p["text"] for p in plain], "spec": [s["text"] for s in spec], "crowd": [c["text"] for c in crowd]}


def main(args: argparse.Namespace) -> int:
    draft = draft_file(args)
    prompts = list(load_prompts(DATA / "heldout_prompts.jsonl", None).values())
    results = []
    print(f"held-out prompts: {len(prompts)}, {args.max_tokens} greedy tokens; {args.concurrency} at once\n")
    print("| main | server | regime | alone: same text as draft_model none | tokens drafted | "
          f"{args.concurrency} at once: same text | tokens drafted |")
    print("|---|---|---|---:|---:|---:|---:|", flush=True)
    for label, path in mains(args):
        for name in args.servers:
            r = {"main": label, "server": name, **one_server(path, draft, SERVERS[name], prompts, args)}
            results.append(r)
            print(f"| {label} | {name} | {r['regime']} | {r['alone_same']}/{r['alone_n']} | {r['alone_drafted']} | "
                  f"{r['crowd_same']}/{r['crowd_n']} | {r['crowd_drafted']} |", flush=True)
    if results and results[0]["regime_why"]:
        print(f"\nregime ({results[0]['main']}): {results[0]['regime_why']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens": args.max_tokens, "results": results}, indent=1))
    return 0
