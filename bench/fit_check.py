"""The memory plan next to what llama.cpp allocates, for the default pair at several context sizes.

Each context size loads in a fresh process (so freed memory from an earlier load does not hide growth):
the plan (`tandem fit`), llama.cpp's reported buffer sizes, the RSS growth at load, and the RSS growth
after one full-batch decode on each model (which touches the compute buffers). Prints a Markdown table.

    python bench/fit_check.py [--ctx 2048 8192 32768] [--q8-ctx 8192] [--threads 2] > docs/fit.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import psutil

MIB = 1 << 20


def one(ctx: int, threads: int, draft_k: str) -> dict:
    from tandem.config import ModelOptions
    from tandem.runtime import Runtime

    rss0 = psutil.Process().memory_info().rss
    rt = Runtime(ModelOptions(ctx_size=ctx, threads=threads, cache_type_k_draft=draft_k), announce=lambda _s: None)
    at_load = psutil.Process().memory_info().rss - rss0
    contexts = [rt.main] + ([rt.drafter.ctx] if rt.drafter else [])
    for c in contexts:  # one full micro-batch: the compute buffer's pages are touched
        tokens = [rt.main_model.bos if rt.main_model.bos >= 0 else 1] * c.params.n_batch
        c.decode(tokens, 0, logits="last")
        c.rollback(0)
    warm = psutil.Process().memory_info().rss - rss0
    rows = []
    for check in rt.checks:
        p, m = check.plan, check.measured
        rows.append({"role": p.role, "model": p.name, "n_ctx": p.params.n_ctx, "cells": p.n_cells,
                     "kv_type": f"{p.params.type_k}/{p.params.type_v}",
                     "plan": {"weights": p.weights, "kv": p.kv, "compute": p.compute, "output": p.output_at_load,
                              "overhead": p.overhead, "total": p.total, "resident": p.resident_at_load},
                     "reported": m, "rss_at_load": check.rss_delta, "ok": check.within_tolerance})
    label = ctx if draft_k == "f16" else f"{ctx}, q8_0 draft K"
    return {"ctx": label, "rows": rows, "plan_total": rt.plan.total, "rss_at_load": at_load, "rss_warm": warm,
            "plan_resident": sum(c.plan.resident_at_load for c in rt.checks)}


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f}"


def pct(got: int | None, want: int) -> str:
    if got is None or not want:
        return ""
    return f" ({(got - want) / want:+.1%})"


def markdown(results: list[dict]) -> str:
    out = ["| ctx | model | KV type | weights plan / llama.cpp | KV plan / llama.cpp | compute plan / llama.cpp "
           "| output plan / llama.cpp | resident plan / RSS at load | within 5% or 32 MiB |",
           "|---:|---|---|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        for row in r["rows"]:
            p, m = row["plan"], row["reported"]
            out.append(f"| {r['ctx']} | {row['role']} {row['model']} | {row['kv_type']} "
                       f"| {mib(p['weights'])} / {mib(m.get('weights'))} | {mib(p['kv'])} / {mib(m.get('kv'))} "
                       f"| {mib(p['compute'])} / {mib(m.get('compute'))}{pct(m.get('compute'), p['compute'])} "
                       f"| {mib(p['output'])} / {mib(m.get('output'))} "
                       f"| {mib(p['resident'])} / {mib(row['rss_at_load'])}{pct(row['rss_at_load'], p['resident'])} "
                       f"| {'yes' if row['ok'] else 'NO'} |")
    out += ["", "Whole process, both models (MiB):", "",
            "| ctx | plan total | RSS growth after one full-batch decode per model | plan resident at load "
            "| RSS growth at load |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        warm = f"{mib(r['rss_warm'])}{pct(r['rss_warm'], r['plan_total'])}"
        load = f"{mib(r['rss_at_load'])}{pct(r['rss_at_load'], r['plan_resident'])}"
        out.append(f"| {r['ctx']} | {mib(r['plan_total'])} | {warm} | {mib(r['plan_resident'])} | {load} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--q8-ctx", type=int, nargs="*", default=[8192],
                    help="context sizes to run again with a q8_0 draft K cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--draft-k", default="f16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.threads, args.draft_k)))
        return 0
    results = []
    for ctx, draft_k in [(c, "f16") for c in args.ctx] + [(c, "q8_0") for c in args.q8_ctx]:
        proc = subprocess.run([sys.executable, __file__, "--one", str(ctx), "--threads", str(args.threads),
                               "--draft-k", draft_k], capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
