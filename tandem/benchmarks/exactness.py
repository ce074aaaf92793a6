"""Does the draft change greedy output? Per main weight type, with exact decoding and with --no-exact.

For each main model and each mode, the dev prompts are generated greedily without and with the draft
(fixed policy, draft-max 8), and the prompts whose outputs differ are counted, with the first token that
differs. The same run times plain and speculative generation in both modes, interleaved, so what exactness
costs is a ratio from one process. Writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tandem.benchmarks.common import add_model_arguments, draft_file, generate_ids, mains, positive_int
from tandem.config import ModelOptions
from tandem.prompts import dev_prompts
from tandem.runtime import Runtime
from tandem.spec.generate import GenParams

HELP = "whether the draft changes greedy output, per main weight type, exact vs --no-exact"
"""One line for `tandem bench --help`."""

MODES = ("exact", "no-exact")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, ("f32", "f16", "q8_0", "q4_k_m"))
    p.add_argument("--num-prompts", type=positive_int, default=len(dev_prompts()), metavar="N",
                   help=f"how many of the {len(dev_prompts())} dev prompts to generate (default: all)")
    p.add_argument("--max-tokens", type=positive_int, default=128, metavar="N",
                   help="tokens per generation (default: 128)")
    p.add_argument("--out", type=Path, default=Path("bench/out/exactness.json"),
                   help="JSON file for every number (default: bench/out/exactness.json)")


def one_model(path: Path, draft: Path, prompts: list[str], tokens: int, threads: int = 0) -> dict:
    """Divergences and tok/s of plain and speculative generation, per mode, for one main model."""
    gp = GenParams(max_tokens=tokens, draft_policy="fixed", draft_max=8)
    rts = {mode: Runtime(ModelOptions(model=str(path), draft=str(draft), ctx_size=1024, threads=threads,
                                      exact=mode == "exact"),
                         announce=lambda _s: None) for mode in MODES}
    try:
        out: dict = {mode: {"diverged": [], "plain_tok_s": [], "spec_tok_s": [],
                            "probe": rts[mode].invariance.describe() if rts[mode].invariance else None}
                     for mode in MODES}
        for i, text in enumerate(prompts):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):  # interleaved
                rt, row = rts[mode], out[mode]
                prompt = rt.prompt(text=text)
                plain, plain_tps = generate_ids(rt, prompt, gp, use_draft=False)
                spec, spec_tps = generate_ids(rt, prompt, gp, spec_type="draft-model")
                first = next((j for j, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
                if first is None and len(plain) != len(spec):
                    first = min(len(plain), len(spec))
                if first is not None:
                    row["diverged"].append({"prompt": i, "first_token": first})
                row["plain_tok_s"].append(plain_tps)
                row["spec_tok_s"].append(spec_tps)
    finally:
        for rt in rts.values():
            rt.close()
    for mode in MODES:
        row = out[mode]
        row["plain_tok_s_median"] = statistics.median(row["plain_tok_s"])
        row["spec_tok_s_median"] = statistics.median(row["spec_tok_s"])
    for kind in ("plain", "spec"):
        out[f"{kind}_exact_vs_no_exact"] = statistics.median(
            a / b for a, b in zip(out["exact"][f"{kind}_tok_s"], out["no-exact"][f"{kind}_tok_s"]) if b)
    return out


def main(args: argparse.Namespace) -> int:
    draft = draft_file(args)
    prompts = dev_prompts()[:args.num_prompts]
    models = mains(args)
    results = []
    print("| main | mode | prompts whose output changes with the draft | plain tok/s | speculative tok/s |")
    print("|---|---|---:|---:|---:|", flush=True)
    for label, path in models:
        r = {"type": label, **one_model(path, draft, prompts, args.max_tokens, args.threads)}
        results.append(r)
        for mode in ("no-exact", "exact"):
            m = r[mode]
            firsts = ", ".join(str(d["first_token"]) for d in m["diverged"])
            changed = f"{len(m['diverged'])}/{len(prompts)}" + (f" (from tokens {firsts})" if firsts else "")
            print(f"| {label} | {mode} | {changed} | {m['plain_tok_s_median']:.1f} | {m['spec_tok_s_median']:.1f} |",
                  flush=True)
        print(f"| {label} | exact / no-exact | | {r['plain_exact_vs_no_exact']:.2f}x "
              f"| {r['spec_exact_vs_no_exact']:.2f}x |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.max_tokens, "results": results}, indent=1))
    print(f"\nwrote {args.out}")
    return 0
