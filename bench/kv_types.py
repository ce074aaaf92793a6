"""Main KV cache f16 vs f32 on the default pair, side by side in one process (exact decoding on).

Two Runtimes (main KV f16 and f32), the bench prompts (200 tokens, greedy), draft-model and the fastest
plain decoding (lone rows, `exact=False`), interleaved and repeated; prints medians of per-(prompt, rep)
ratios and whether every output matched.

    .venv/bin/python bench/kv_types.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

from tandem.config import ModelOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token


def one(rt: Runtime, prompt: list[int], gp: GenParams, use_draft: bool) -> tuple[list[int], float]:
    ids, tps = [], 0.0
    for ev in rt.generate(prompt, gp, use_draft=use_draft, exact=None if use_draft else False):
        if isinstance(ev, Token):
            ids.append(ev.id)
        elif isinstance(ev, Done):
            tps = ev.stats.tokens_per_second
    return ids, tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    prompts = [json.loads(line)["prompt"] for line in (DATA / "bench_prompts.jsonl").read_text().splitlines() if line]
    rts = {kv: Runtime(ModelOptions(cache_type_k=kv, cache_type_v=kv), announce=lambda s: None) for kv in ("f16", "f32")}
    gp = GenParams(max_tokens=200)
    tps: dict[tuple[str, bool], list[float]] = {(kv, d): [] for kv in rts for d in (False, True)}
    texts: dict[tuple[str, bool], list[list[int]]] = {k: [] for k in tps}
    for rep in range(args.reps):
        for i, text in enumerate(prompts):
            order = [(kv, d) for kv in rts for d in (True, False)]
            for kv, d in (order if (rep + i) % 2 == 0 else order[::-1]):
                ids, t = one(rts[kv], rts[kv].prompt(text=text), gp, d)
                tps[(kv, d)].append(t)
                texts[(kv, d)].append(ids)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for kv in rts:
        print(f"main KV {kv}: draft-model {med(tps[(kv, True)]):.1f} tok/s, plain (lone rows) {med(tps[(kv, False)]):.1f}; "
              f"draft-model / plain {med(a / b for a, b in zip(tps[(kv, True)], tps[(kv, False)])):.2f}x")
    for d, name in ((True, "draft-model"), (False, "plain (lone rows)")):
        r = med(a / b for a, b in zip(tps[("f16", d)], tps[("f32", d)]))
        print(f"{name}: f16 / f32 KV {r:.2f}x")
    print("draft-model output equal, f16 vs f32 KV:", texts[("f16", True)] == texts[("f32", True)])


if __name__ == "__main__":
    main()
