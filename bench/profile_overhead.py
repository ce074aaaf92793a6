"""Python overhead per generated token, measured with cProfile on the default pair.

    .venv/bin/python bench/profile_overhead.py [--tokens 200]

Overhead = wall time of the decode phase minus the time spent inside llama_decode (main + draft).
"""

import argparse
import cProfile
import pstats
import time

from tandem.config import ModelOptions
from tandem.prompts import lmstudio_prompts
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token


def one(rt, tokens, gp, use_draft):
    ctxs = [rt.main, rt.drafter.ctx]
    t0, first, llama0 = time.perf_counter(), None, None
    for ev in rt.generate(tokens, gp, use_draft=use_draft):
        if isinstance(ev, Token) and first is None:
            first, llama0 = time.perf_counter(), sum(c.decode_seconds for c in ctxs)
        if isinstance(ev, Done):
            stats = ev.stats
    wall = time.perf_counter() - first
    llama = sum(c.decode_seconds for c in ctxs) - llama0
    return wall, llama, stats.generated_tokens - 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    rt = Runtime(ModelOptions(ctx_size=2048), announce=print)
    gp = GenParams(max_tokens=args.tokens)
    prompts = [rt.prompt(text=t) for t in lmstudio_prompts()]
    for use_draft in (False, True):
        one(rt, prompts[0], gp, use_draft)  # warm-up
        prof = cProfile.Profile()
        tot_wall = tot_llama = tot_n = 0.0
        for p in prompts:
            prof.enable()
            wall, llama, n = one(rt, p, gp, use_draft)
            prof.disable()
            tot_wall, tot_llama, tot_n = tot_wall + wall, tot_llama + llama, tot_n + n
        label = "draft" if use_draft else "no-draft"
        print(f"\n== {label}: {tot_n:.0f} tokens, wall {tot_wall:.2f} s, in llama_decode {tot_llama:.2f} s, "
              f"Python overhead {1000 * (tot_wall - tot_llama) / tot_n:.2f} ms/token "
              f"({100 * (tot_wall - tot_llama) / tot_wall:.1f}% of wall; profiler on)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
