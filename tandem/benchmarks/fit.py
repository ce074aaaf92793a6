"""The memory plan (`tandem fit`) next to what llama.cpp allocates, at several context sizes.

Each context size loads in a fresh process, so that memory freed by an earlier load does not hide growth:
the plan, llama.cpp's reported buffer sizes, the resident-memory (RSS) growth at load, and the RSS growth
after one full-batch decode on each model (which touches the compute buffers). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import psutil

from tandem.benchmarks.common import positive_int
from tandem.config import ModelOptions

HELP = "memory plan vs what llama.cpp allocates, per context size"
"""One line for `tandem bench --help`."""

MIB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx-size", type=positive_int, nargs="+", default=[2048, 8192, 32768], metavar="N",
                   help="context sizes (default: 2048 8192 32768)")
    p.add_argument("--q8-ctx-size", type=positive_int, nargs="*", default=[8192], metavar="N",
                   help="context sizes to load again with a q8_0 draft K cache (default: 8192)")
    p.add_argument("--threads", type=int, default=ModelOptions.threads,
                   help="CPU threads; 0 means all cores (default: 0)")
    p.add_argument("--model", default=None, metavar="GGUF", help="main model (default: the embedded pair)")
    p.add_argument("--draft", default=None, metavar="GGUF",
                   help="draft model, or 'none' (default: the embedded draft when --model is not given)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--draft-k", default="f16", help=argparse.SUPPRESS)


def one(ctx: int, args: argparse.Namespace) -> dict:
    """Load at one context size in this process; the plan, llama.cpp's buffers and the RSS growth."""
    from tandem.runtime import Runtime

    rss0 = psutil.Process().memory_info().rss
    rt = Runtime(ModelOptions(model=args.model, draft=args.draft, ctx_size=ctx, threads=args.threads,
                              cache_type_k_draft=args.draft_k), announce=lambda _s: None)
    at_load = psutil.Process().memory_info().rss - rss0
    for c in [rt.main] + ([rt.drafter.ctx] if rt.drafter else []):  # one full micro-batch touches the compute buffer
        c.decode([max(rt.main_model.bos, 0)] * min(c.params.n_batch, c.n_ctx), 0, logits="last")
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
    label = ctx if args.draft_k == "f16" else f"{ctx}, {args.draft_k} draft K"
    # the RSS growth is measured from a process that has imported everything: the plan's process line is not in it
    return {"ctx": label, "rows": rows, "plan_total": rt.plan.total - rt.plan.process, "rss_at_load": at_load,
            "rss_warm": warm,
            "plan_resident": sum(c.plan.resident_at_load for c in rt.checks)}


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f}"


def pct(got: int | None, want: int) -> str:
    return "" if got is None or not want else f" ({(got - want) / want:+.1%})"


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
            "| ctx | plan total, models | RSS growth after one full-batch decode per model | plan resident at load "
            "| RSS growth at load |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        warm = f"{mib(r['rss_warm'])}{pct(r['rss_warm'], r['plan_total'])}"
        load = f"{mib(r['rss_at_load'])}{pct(r['rss_at_load'], r['plan_resident'])}"
        out.append(f"| {r['ctx']} | {mib(r['plan_total'])} | {warm} | {mib(r['plan_resident'])} | {load} |")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    results = []
    for ctx, draft_k in [(c, "f16") for c in args.ctx_size] + [(c, "q8_0") for c in args.q8_ctx_size]:
        cmd = [sys.executable, "-m", "tandem", "bench", "fit", "--one", str(ctx), "--threads", str(args.threads),
               "--draft-k", draft_k]
        cmd += (["--model", args.model] if args.model else []) + (["--draft", args.draft] if args.draft else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # the child's own error line (cause and fix) and exit code
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"context {ctx}: failed",
                  file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(markdown(results))
    return 0
