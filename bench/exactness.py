"""Does a draft change greedy output? Per main weight type, with --exact (the default) and --no-exact.

For each main type (derived from the packaged SmolLM2-135M with llama.cpp's quantize API) and each mode, the
ten dev prompts are generated greedily without and with the Q4_1 draft (fixed policy, draft-max 8, 128
tokens), and the prompts whose outputs differ are counted. The same run times plain (no-draft) and
speculative generation in both modes, interleaved, so the cost of exactness is a ratio from one process.

    .venv/bin/python bench/exactness.py [--types f32 f16 q8_0 q4_k_m] [--tokens 128] [--out docs/exactness.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tandem.config import ModelOptions
from tandem.models.defaults import cache_dir, derive, draft_path, main_path
from tandem.prompts import dev_prompts
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main_file(kind: str) -> Path:
    """The main model of this weight type, derived from the F32 one once (cached)."""
    if kind == "f32":
        return main_path()
    path = cache_dir() / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
    return path if path.exists() else derive(main_path(), path, kind)


def run(rt: Runtime, prompt: list[int], gp: GenParams, use_draft: bool) -> tuple[list[int], float]:
    ids, tps = [], 0.0
    for ev in rt.generate(prompt, gp, use_draft=use_draft):
        if isinstance(ev, Token):
            ids.append(ev.id)
        elif isinstance(ev, Done):
            tps = ev.stats.tokens_per_second
    return ids, tps


def one_type(kind: str, tokens: int) -> dict:
    gp = GenParams(max_tokens=tokens, draft_policy="fixed", draft_max=8)
    rts = {mode: Runtime(ModelOptions(model=str(main_file(kind)), draft=str(draft_path()), ctx_size=1024,
                                      exact=mode == "exact"), announce=lambda s: None)
           for mode in ("exact", "no-exact")}
    out: dict = {"type": kind}
    for mode, rt in rts.items():
        out[mode] = {"diverged": [], "plain_tok_s": [], "spec_tok_s": [],
                     "probe": rt.invariance.describe() if rt.invariance else None}
    for i, text in enumerate(dev_prompts()):
        for mode in (("exact", "no-exact") if i % 2 == 0 else ("no-exact", "exact")):  # interleaved
            rt, row = rts[mode], out[mode]
            prompt = rt.prompt(text=text)
            plain, plain_tps = run(rt, prompt, gp, False)
            spec, spec_tps = run(rt, prompt, gp, True)
            first = next((j for j, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
            if first is not None or len(plain) != len(spec):
                row["diverged"].append({"prompt": i, "first_token": first})
            row["plain_tok_s"].append(plain_tps)
            row["spec_tok_s"].append(spec_tps)
    for mode in rts:
        row = out[mode]
        row["plain_tok_s_median"] = statistics.median(row["plain_tok_s"])
        row["spec_tok_s_median"] = statistics.median(row["spec_tok_s"])
    out["plain_exact_vs_no_exact"] = statistics.median(
        a / b for a, b in zip(out["exact"]["plain_tok_s"], out["no-exact"]["plain_tok_s"]))
    out["spec_exact_vs_no_exact"] = statistics.median(
        a / b for a, b in zip(out["exact"]["spec_tok_s"], out["no-exact"]["spec_tok_s"]))
    for rt in rts.values():
        rt.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0", "q4_k_m"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=DOCS / "exactness.json")
    args = ap.parse_args()
    results = []
    print("| main | mode | prompts whose output changes with the draft | plain tok/s | speculative tok/s |")
    print("|---|---|---:|---:|---:|")
    for kind in args.types:
        r = one_type(kind, args.tokens)
        results.append(r)
        for mode in ("no-exact", "exact"):
            m = r[mode]
            firsts = ", ".join(str(d["first_token"]) for d in m["diverged"])
            print(f"| {kind.upper()} | {mode} | {len(m['diverged'])}/10{f' (from token {firsts})' if firsts else ''} "
                  f"| {m['plain_tok_s_median']:.1f} | {m['spec_tok_s_median']:.1f} |", flush=True)
        print(f"|   | exact / no-exact | | {r['plain_exact_vs_no_exact']:.2f}x | {r['spec_exact_vs_no_exact']:.2f}x |",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
