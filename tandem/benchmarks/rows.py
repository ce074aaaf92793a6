"""How much a token's logits depend on how many rows share its decode, per main weight type.

For each main model: tandem.engine.exact.probe (64 tokens of text in the cache, then the next rows decoded
in batches of 1, 2, 3, 4, 5, 8 and 17; max |logit difference|) and probe_model_sequences (a sequence decoded
among three others sharing its batches, with fixed KV cells per sequence) with the weights as the exact mode loads
them (not repacked) and as llama.cpp does by default (repacked). ggml's tiled K-quant matmul is
process-wide: Tandem turns it off; run with GGML_CPU_TILED_MM=1 in the environment to measure it on. With
GGML_SGEMM_ONE_ROW=1 (Tandem's llama.cpp patch) one-row matmuls take tinyBLAS too: the lone-row column then
shows whether that makes lone rows exact (with the f16 KV cache it does; with f32, the attention's one-row
product still takes ggml's dot product).
"""

from __future__ import annotations

import argparse
import os

from tandem.benchmarks.common import add_model_arguments, mains
from tandem.engine import exact
from tandem.engine.llama import Context, ContextParams, Model

HELP = "logit differences by batch size, per main weight type (the exactness probe)"
"""One line for `tandem bench --help`."""

ROWS = 17
"""Largest batch probed: a 16-token draft's verification."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, ("f32", "f16", "q8_0", "q4_0", "q4_k_m"), draft=False)
    p.add_argument("--cache-type", default="f16", choices=("f32", "f16"),
                   help="the main models' KV cache type (default: f16, Tandem's default)")


def main(args: argparse.Namespace) -> int:
    models = mains(args)
    print(f"GGML_CPU_TILED_MM={os.environ.get('GGML_CPU_TILED_MM', '0 (Tandem sets it)')}, "
          f"GGML_SGEMM_ONE_ROW={os.environ.get('GGML_SGEMM_ONE_ROW', '0')}, KV cache {args.cache_type}\n")
    print("| main | weights repacked | lone row vs 2-row batch | batches of 3-17 rows vs 2 | a sequence among 4, "
          "paged cells (patch) |")
    print("|---|---|---:|---:|---:|", flush=True)
    for label, path in models:
        for repack in (False, True):
            model = Model(path, repack=repack)
            try:
                params = ContextParams(n_ctx=256, n_threads=args.threads, exact=True, type_k=args.cache_type,
                                       type_v=args.cache_type)
                ctx = Context(model, params)
                try:
                    inv = exact.probe(ctx, exact.probe_tokens(ctx, exact.probe_length(ROWS)), max_rows=ROWS)
                finally:
                    ctx.close()
                seqs = exact.probe_model_sequences(model, params)
            finally:
                model.close()
            print(f"| {label} | {'yes' if repack else 'no'} | {inv.single_row_diff:.1e} | {inv.multi_row_diff:.1e} | "
                  f"{seqs.diff:.1e} |", flush=True)
    return 0
