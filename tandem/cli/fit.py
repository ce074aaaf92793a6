"""`tandem fit`: the memory plan of a model and its draft, before loading anything (reads GGUF headers only).

Exit status: 0 when the plan fits, 3 when it does not (the same as `tandem serve` refusing to start),
2 for bad input (a missing or non-GGUF file, invalid options).
"""

from __future__ import annotations

import argparse
import json

from tandem.cli.options import add_options, build
from tandem.config import ModelOptions, SpecOptions
from tandem.errors import DoesNotFitError
from tandem.models.fit import FitPlan, ModelPlan, available_memory, fmt, make_plan
from tandem.models.gguf_header import read_header
from tandem.runtime import resolve_paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--draft-max", type=int, default=SpecOptions.draft_max,
                   help="most tokens drafted per step: sets the main model's logits rows "
                        f"(default: {SpecOptions.draft_max})")
    add_options(p, ModelOptions, skip=("draft_optional",))


def plan_from_args(args: argparse.Namespace, announce=print) -> FitPlan:
    opts = build(ModelOptions, args)
    paths = resolve_paths(opts, announce)
    memory = available_memory(opts.memory_limit)
    draft = read_header(paths.draft) if paths.draft is not None else None
    return make_plan(opts, read_header(paths.main), draft, memory, draft_max=args.draft_max)


_ROWS = (("KV cache", "kv"), ("compute buffer", "compute"), ("output buffer", "output"), ("work buffer", "work"))
"""Per-context rows: (label, ModelPlan attribute)."""


def render(plan: FitPlan) -> str:
    """The plan as text: a column per model, the memory, the verdict, fixes, and the draft context savings."""
    models: list[ModelPlan] = [plan.main] + ([plan.draft] if plan.draft else [])
    head = [f"{m.role} {m.name}" for m in models]
    rows = [("context", [f"{m.params.n_ctx} tokens ({m.n_cells} KV cells)" for m in models]),
            ("KV cache type (K/V)", [f"{m.params.type_k}/{m.params.type_v}" for m in models]),
            ("weights", [fmt(m.weights) for m in models]),
            ("tokenizer, other", [fmt(m.overhead) for m in models])]
    if plan.main.params.n_seq_max > 1:
        rows.append(("contexts", [f"1 ({m.params.n_seq_max} requests)" if m.params.n_seq_max > 1 else
                                  f"{m.contexts} (one per request)" for m in models]))
    each = " (each)" if any(m.contexts > 1 for m in models) else ""
    rows += [(label + each, [fmt(getattr(m, attr)) for m in models]) for label, attr in _ROWS]
    rows.append(("total", [fmt(m.total) for m in models]))
    width = max(len(r[0]) for r in rows) + 2
    cols = [max(len(h), *(len(r[1][i]) for r in rows)) + 2 for i, h in enumerate(head)]
    n = plan.main.params.n_seq_max
    lines = ["Memory plan (llama.cpp on the CPU, batch 512, flash attention off"
             + (f"; --parallel {n}: --ctx-size is the total, {plan.main.params.n_ctx // n} positions per request"
                if n > 1 else "") + ")", ""]
    lines.append(" " * width + "".join(h.rjust(c) for h, c in zip(head, cols)))
    lines += [label.ljust(width) + "".join(v.rjust(c) for v, c in zip(vals, cols)) for label, vals in rows]
    m = plan.memory
    lines += ["", f"process      {fmt(plan.process)} (Python, the HTTP server, the heap it keeps)",
              f"total        {fmt(plan.total)}",
              f"available    {fmt(m.available)} ({m.source}; RAM {fmt(m.ram_total)})",
              "VRAM         none used (Tandem runs llama.cpp on the CPU)" if m.vram is None else
              f"VRAM         {fmt(m.vram)}",
              f"verdict      {plan.verdict()}"]
    fixes = plan.fixes()
    if fixes:
        lines.append(f"largest --ctx-size that fits: {plan.max_ctx}" if plan.max_ctx else
                     "no context size fits")
        lines += ["fixes:"] + [f"  - {f}" for f in fixes]
    if plan.savings:
        lines += ["", "draft context (--ctx-size-draft): draft total, saved against the main context size"]
        current = plan.draft.params.n_ctx * plan.draft.contexts if plan.draft else None  # the --ctx-size-draft
        lines += [f"  {s.n_ctx:>7}  {fmt(s.total):>10}  saves {fmt(s.saved):>10}"
                  + ("   <- this plan" if s.n_ctx == current else "") for s in plan.savings]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    plan = plan_from_args(args, announce=lambda s: None if args.json else print(s))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render(plan))
    return 0 if plan.fits else DoesNotFitError.exit_code
