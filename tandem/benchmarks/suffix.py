"""Drafts from earlier requests (the suffix cache), against plain decoding and llama-server's ngram-mod.

One server lifetime per side, the same requests in the same order, greedy:
  fresh   the bench prompts, each for the first time (nothing to find: drafting must cost nothing);
  repeat  the same prompts again (the earlier answer is in the cache);
  trace   an agent-style conversation: a function, then --turns requests to change one thing in it, each
          answer (the whole function again) appended to the conversation.
Sides: Tandem without speculation (--draft none), Tandem as configured (lookups and the cache, and the --draft model
if given), and with --llama-server PATH, llama-server without a draft and with --spec-type ngram-mod (its pool of
n-grams spans requests). Decode time is each side's own (Tandem's stats.generation_time, llama-server's
timings.predicted_ms); tok/s is generated tokens over decode time, summed over a scenario's requests. Tandem's texts
are checked against Tandem without speculation, request by request.

With --clients N: N such traces at once instead, over HTTP (tandem.benchmarks.suffix_clients).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from tandem.benchmarks import suffix_clients
from tandem.benchmarks.common import load_prompts, positive_int
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.config import ModelOptions, SpecOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token

HELP = "drafts from earlier requests: fresh, repeated and agent-trace requests vs plain and llama-server ngram-mod"
"""One line for `tandem bench --help`."""

TASK = ("Write a Python function `summarize(orders)` that takes a list of dicts with keys 'customer', 'amount' and "
        "'status', and returns a dict mapping each customer to the total amount of their orders whose status is "
        "'paid'. Include a docstring. Reply with the complete function only.")
CHANGES = ("Change it so that amounts are rounded to 2 decimals in the result. Reply with the complete function only.",
           "Also skip orders whose amount is negative. Reply with the complete function only.",
           "Rename the function to `totals_by_customer`. Reply with the complete function only.",
           "Also accept the status 'settled' as paid. Reply with the complete function only.",
           "Add type hints to the signature. Reply with the complete function only.",
           "Sort the result by total, largest first, and return it as a dict. Reply with the complete function only.")
SYSTEM = "You are a coding assistant. You answer with code only, no explanations."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, metavar="GGUF", help="main model")
    p.add_argument("--draft", type=Path, default=None, metavar="GGUF",
                   help="draft model Tandem's configured side loads (default: none, the lookups alone)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads; 0 means all cores")
    p.add_argument("--ctx-size", type=positive_int, default=8192, help="context size (default: 8192)")
    p.add_argument("--prompts", type=Path, default=DATA / "bench_prompts.jsonl", help="fresh and repeated prompts")
    p.add_argument("--only", nargs="*", default=None, help="prompt ids to run (default: all)")
    p.add_argument("--max-tokens", type=positive_int, default=200, help="tokens per fresh or repeated request")
    p.add_argument("--turns", type=positive_int, default=5,
                   help=f"trace turns that change the function (at most {len(CHANGES)}; default: 5), after the one "
                        "that writes it (not counted)")
    p.add_argument("--trace-tokens", type=positive_int, default=400, help="tokens per trace turn (default: 400)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server at PATH, without a draft and with --spec-type ngram-mod")
    p.add_argument("--clients", type=positive_int, default=None, metavar="N",
                   help="run N traces at once over HTTP instead (tandem serve --parallel N vs llama-server -np N)")
    p.add_argument("--out", type=Path, default=Path("bench/out/suffix.json"), help="JSON results")


@dataclass
class Scenario:
    """One side's requests of one scenario: generated tokens and decode seconds, summed; texts per request."""

    tokens: int = 0
    seconds: float = 0.0
    texts: list[str] = field(default_factory=list)
    cache_drafts: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, tokens: int, seconds: float, text: str, cache_drafts: int = 0) -> None:
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.texts.append(text)
        self.cache_drafts += cache_drafts


class _Tandem:
    """Tandem in this process: `speculate` False decodes as --draft none."""

    def __init__(self, rt: Runtime, speculate: bool):
        self.rt, self.speculate = rt, speculate

    def ask(self, messages: list[dict], max_tokens: int) -> tuple[int, float, str, int]:
        prompt = self.rt.prompt(messages=messages)
        ids, stats = [], None
        for ev in self.rt.generate(prompt, GenParams(max_tokens=max_tokens, draft_max=16), use_draft=self.speculate):
            if isinstance(ev, Token):
                ids.append(ev.id)
            elif isinstance(ev, Done):
                stats = ev.stats
        return (stats.generated_tokens, stats.generation_time, self.rt.main_model.detokenize(ids),
                stats.drafted_by_source.get("cache", 0))


class _Peer:
    """llama-server, prompts as Tandem's token ids (its slot's prompt cache on, as a chat client gets it)."""

    def __init__(self, peer: LlamaServerPeer, rt: Runtime):
        self.peer, self.rt = peer, rt

    def ask(self, messages: list[dict], max_tokens: int) -> tuple[int, float, str, int]:
        r = self.peer.complete(self.rt.prompt(messages=messages), max_tokens, cache_prompt=True)
        return r.tokens, r.seconds, self.rt.main_model.detokenize(r.token_ids), 0


def _run_side(side, prompts: dict[str, str], args: argparse.Namespace, log) -> dict[str, Scenario]:
    out = {name: Scenario() for name in ("fresh", "repeat", "trace")}
    for name in ("fresh", "repeat"):
        for pid, text in prompts.items():
            out[name].add(*side.ask([{"role": "user", "content": text}], args.max_tokens))
        log(f"  {name}: {out[name].tokens} tokens in {out[name].seconds:.1f} s, {out[name].rate:.1f} tok/s")
    messages = [{"role": "system", "content": SYSTEM}]
    for turn, ask in enumerate((TASK, *CHANGES[:args.turns])):
        messages.append({"role": "user", "content": ask})
        n, s, text, cache = side.ask(messages, args.trace_tokens)
        if turn > 0:  # the first turn writes the function: nothing earlier to draft from
            out["trace"].add(n, s, text, cache)
        else:
            out["trace"].texts.append(text)
        messages.append({"role": "assistant", "content": text})
    log(f"  trace: {out['trace'].tokens} tokens in {out['trace'].seconds:.1f} s, {out['trace'].rate:.1f} tok/s")
    return out


def main(args: argparse.Namespace) -> int:
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.clients:
        results = suffix_clients.run(args, log)
        print(suffix_clients.markdown(results, args.clients))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({k: {"tok_s": round(r[0], 2), "tokens": r[1], "seconds": round(r[2], 2)}
                                        for k, r in results.items()}, indent=1))
        return 0
    prompts = load_prompts(args.prompts, args.only)
    opts = ModelOptions(model=str(args.model), draft=str(args.draft) if args.draft else None, ctx_size=args.ctx_size,
                        threads=args.threads)
    results: dict[str, dict[str, Scenario]] = {}
    rt = Runtime(replace(opts, draft="none"), spec=SpecOptions(), announce=log)
    try:
        log("tandem --draft none")
        results["tandem-plain"] = _run_side(_Tandem(rt, False), prompts, args, log)
    finally:
        rt.close()
    rt = Runtime(opts, spec=SpecOptions(), announce=log)  # a fresh server lifetime: an empty cache
    try:
        log(f"tandem (default; draft {rt.draft_name}{', paused' if rt.draft_paused else ''})")
        results["tandem"] = _run_side(_Tandem(rt, True), prompts, args, log)
        if args.llama_server:
            base = PeerSettings(main=args.model, ctx_size=args.ctx_size, threads=rt.main.params.threads(),
                                cache_type_k="f16", cache_type_v="f16")
            for name, settings in (("llama-server", base), ("llama-server-ngram-mod", replace(base, spec_type="ngram-mod"))):
                peer = LlamaServerPeer(args.llama_server, settings, name=name)
                log(name)
                try:
                    peer.start()
                    results[name] = _run_side(_Peer(peer, rt), prompts, args, log)
                finally:
                    peer.close()
    finally:
        rt.close()
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({side: {k: {"tokens": v.tokens, "seconds": round(v.seconds, 3),
                                                "tok_s": round(v.rate, 2), "cache_drafts": v.cache_drafts,
                                                "texts": v.texts} for k, v in sc.items()}
                                    for side, sc in results.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


def markdown(results: dict[str, dict[str, Scenario]]) -> str:
    """One row per scenario: tok/s of each side, Tandem's ratios, and whether its texts equal --draft none's."""
    plain = results["tandem-plain"]
    sides = [s for s in results if s != "tandem-plain"]
    head = ["scenario", "Tandem --draft none", *sides, "Tandem / --draft none"]
    peer = "llama-server-ngram-mod" in results
    if peer:
        head += ["Tandem / ngram-mod", "Tandem / llama-server best"]
    head.append("text = --draft none")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("fresh", "repeat", "trace"):
        mine = results["tandem"][name]
        row = [name, f"{plain[name].rate:.1f}", *(f"{results[s][name].rate:.1f}" for s in sides),
               f"{mine.rate / plain[name].rate:.2f}x"]
        if peer:
            best = max(results[s][name].rate for s in results if s.startswith("llama-server"))
            row += [f"{mine.rate / results['llama-server-ngram-mod'][name].rate:.2f}x", f"{mine.rate / best:.2f}x"]
        same = sum(a == b for a, b in zip(mine.texts, plain[name].texts))
        row.append(f"{same}/{len(mine.texts)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
