"""The main model's KV cache f16 against f32, side by side in one process: speculative and plain decoding.

Two Runtimes of the pair (main KV f16 and f32, exact decoding on), the bench prompts, draft-model and the
fastest plain decoding (lone rows, as --no-exact decodes), interleaved and repeated. Prints medians of
per-(prompt, repetition) tok/s ratios and whether the speculative outputs of the two KV types match.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from tandem.benchmarks.common import (add_model_arguments, draft_file, generate_ids, load_prompts, one_main,
                                      positive_int)
from tandem.config import ModelOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import GenParams

HELP = "main KV cache f16 vs f32, speculative and plain decoding side by side"
"""One line for `tandem bench --help`."""

KV = ("f16", "f32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--prompts", type=Path, default=DATA / "bench_prompts.jsonl",
                   help="JSONL file of {id, prompt} (default: the bench prompts of `tandem bench`)")
    p.add_argument("--max-tokens", type=positive_int, default=200, metavar="N",
                   help="tokens per generation (default: 200)")
    p.add_argument("--reps", type=positive_int, default=3, metavar="N", help="repetitions of every prompt (default: 3)")


def main(args: argparse.Namespace) -> int:
    texts = list(load_prompts(args.prompts, None).values())
    main_path, draft = one_main(args), draft_file(args)
    gp = GenParams(max_tokens=args.max_tokens)
    rts = {kv: Runtime(ModelOptions(model=str(main_path), draft=str(draft), cache_type_k=kv, cache_type_v=kv,
                                    threads=args.threads, exact=True),
                       announce=lambda _s: None) for kv in KV}
    keys = [(kv, spec) for kv in KV for spec in (True, False)]
    tps: dict[tuple[str, bool], list[float]] = {k: [] for k in keys}
    ids: dict[tuple[str, bool], list[list[int]]] = {k: [] for k in keys}
    try:
        for rep in range(args.reps):
            for i, text in enumerate(texts):
                for kv, spec in (keys if (rep + i) % 2 == 0 else keys[::-1]):
                    rt = rts[kv]
                    kw = {"spec_type": "draft-model"} if spec else {"use_draft": False, "exact": False}
                    out, t = generate_ids(rt, rt.prompt(text=text), gp, **kw)
                    tps[(kv, spec)].append(t)
                    ids[(kv, spec)].append(out)
    finally:
        for rt in rts.values():
            rt.close()
    med = statistics.median
    for kv in KV:
        print(f"main KV {kv}: draft-model {med(tps[(kv, True)]):.1f} tok/s, plain (lone rows) "
              f"{med(tps[(kv, False)]):.1f}; draft-model / plain "
              f"{med(a / b for a, b in zip(tps[(kv, True)], tps[(kv, False)]) if b):.2f}x")
    for spec, name in ((True, "draft-model"), (False, "plain (lone rows)")):
        print(f"{name}: f16 / f32 KV {med(a / b for a, b in zip(tps[('f16', spec)], tps[('f32', spec)]) if b):.2f}x")
    print(f"draft-model output equal, f16 vs f32 KV: {'yes' if ids[('f16', True)] == ids[('f32', True)] else 'NO'}")
    return 0
