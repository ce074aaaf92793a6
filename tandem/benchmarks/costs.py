"""Milliseconds of one llama_decode by batch size, for main models and the draft: what bounds speculation's gain.

A step that drafts k tokens costs about k draft decodes plus one main decode of k + 1 tokens. By default
each main model decodes 1 to 17 tokens (all logits, lone rows as llama.cpp decodes them) after OFFSET cached
tokens, and the draft 1 and 2 tokens; --by-position times the first main model's 1- and 17-token decodes
at several KV positions, with an f32 and an f16 KV cache. Timings are the runtime's own calibrations
(tandem.runtime.calibrate_verify and calibrate_draft), medians of --reps decodes. --lone-row times what exact
decoding costs a plain step: a lone row through the batch kernels (an exact context on Tandem's patched library)
against llama.cpp's own one-row kernels, the two contexts side by side on one model, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tandem.benchmarks.common import add_model_arguments, draft_file, mains, positive_int
from tandem.config import ModelOptions
from tandem.engine.exact import probe_tokens
from tandem.engine.library import exact_kernels
from tandem.engine.llama import Context, ContextParams, Model
from tandem.runtime import CALIBRATION_SIZES, calibrate_draft, calibrate_verify

HELP = "milliseconds per llama_decode by batch size (--by-position: by KV position)"
"""One line for `tandem bench --help`."""

OFFSET = 60
"""Tokens already in the KV cache when each batch is decoded (default table)."""
BY_POSITION_SIZES = (1, 17)
"""Batch sizes of the --by-position table: a plain step and a 16-token draft's verification."""
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, ("f32", "f16"))
    p.add_argument("--reps", type=positive_int, default=30, metavar="N",
                   help="decodes timed per cell; the table shows the median (default: 30)")
    p.add_argument("--cache-type", default=ModelOptions.cache_type_k, choices=KV_TYPES,
                   help=f"the main models' KV cache type (default: {ModelOptions.cache_type_k}); the draft's is "
                        f"{ModelOptions.cache_type_k_draft}")
    p.add_argument("--by-position", action="store_true",
                   help="instead: the first main model's 1- and 17-token decodes at each of --positions, f32 vs "
                        "f16 KV cache (how a long context slows verification)")
    p.add_argument("--positions", type=positive_int, nargs="+", default=[200, 1000, 1800], metavar="N",
                   help="KV positions of --by-position (default: 200 1000 1800)")
    p.add_argument("--lone-row", action="store_true",
                   help="instead: each main model's lone-row decode with exact decoding's batch kernels vs "
                        "llama.cpp's own one-row kernels, interleaved")


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _timed(path: Path, kv: str, n_ctx: int, threads: int, measure) -> dict:
    model = Model(path)
    try:
        ctx = Context(model, ContextParams(n_ctx=n_ctx, n_threads=threads, type_k=kv, type_v=kv))
        try:
            return measure(ctx, max(model.bos, 0))
        finally:
            ctx.close()
    finally:
        model.close()


def by_batch_size(args: argparse.Namespace) -> None:
    sizes = CALIBRATION_SIZES
    print("| model | KV | " + " | ".join(f"{n} tok" for n in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes), flush=True)
    for label, path in mains(args):
        ms = _timed(path, args.cache_type, 1024, args.threads,
                    lambda ctx, tok: calibrate_verify(ctx, tok, reps=args.reps, offset=OFFSET))
        print(f"| main {label} | {args.cache_type} | " + " | ".join(_ms(ms.get(n)) for n in sizes) + " |", flush=True)
    draft = draft_file(args)
    kv = ModelOptions.cache_type_k_draft
    ms = _timed(draft, kv, 1024, args.threads, lambda ctx, tok: calibrate_draft(ctx, tok, reps=args.reps, batch=OFFSET))
    cells = {1: ms.get("one"), 2: ms.get("two")}
    print(f"| draft {draft.stem} | {kv} | " + " | ".join(_ms(cells.get(n)) for n in sizes) + " |")


def lone_row(args: argparse.Namespace) -> None:
    """A lone row after OFFSET cached tokens (last logits), exact context vs llama.cpp's one-row kernels."""
    if not exact_kernels():
        print("this library has no batch kernels for lone rows (Tandem's llama.cpp patch level 5): nothing to time")
        return
    print(f"one lone-row decode after {OFFSET} cached tokens ({args.cache_type} KV), median of {args.reps}, "
          "the two contexts interleaved\n")
    print("| main | one-row kernels (switch off) | exact decoding (batch kernels; paired with an f32 cache) | "
          "exact / switch off |")
    print("|---|---:|---:|---:|", flush=True)
    for label, path in mains(args):
        model = Model(path)
        ctxs: dict[bool, Context] = {}
        try:
            for ex in (False, True):
                ctxs[ex] = Context(model, ContextParams(n_ctx=512, n_batch=64, n_threads=args.threads, exact=ex,
                                                        type_k=args.cache_type, type_v=args.cache_type))
            toks = probe_tokens(ctxs[False], OFFSET + 40)
            for ctx in ctxs.values():
                ctx.decode(toks[:OFFSET], 0, logits="none")
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.reps):
                for ex in ((False, True) if r % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    ctxs[ex].decode([toks[OFFSET + r % 40]], OFFSET)
                    times[ex].append(time.perf_counter() - t0)
                    ctxs[ex].rollback(OFFSET)
        finally:
            for ctx in ctxs.values():
                ctx.close()
            model.close()
        stock, exact = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {label} | {_ms(stock)} | {_ms(exact)} | {exact / stock:.2f}x |", flush=True)


def by_position(args: argparse.Namespace) -> None:
    label, path = mains(args)[0]
    positions = sorted(args.positions)
    n_ctx = positions[-1] + max(CALIBRATION_SIZES)
    print(f"main {label}, one decode (all logits, lone rows), median of {args.reps}\n")
    print("| main KV | tokens | " + " | ".join(f"position {p}" for p in positions) + " |")
    print("|---|---:|" + "---:|" * len(positions), flush=True)
    for kv in ("f32", "f16"):
        at = {pos: _timed(path, kv, n_ctx, args.threads,
                          lambda ctx, tok, pos=pos: calibrate_verify(ctx, tok, reps=args.reps, offset=pos))
              for pos in positions}
        for n in BY_POSITION_SIZES:
            print(f"| {kv} | {n} | " + " | ".join(_ms(at[p].get(n)) for p in positions) + " |", flush=True)


def main(args: argparse.Namespace) -> int:
    (lone_row if args.lone_row else by_position if args.by_position else by_batch_size)(args)
    return 0
