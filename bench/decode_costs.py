"""What one llama_decode costs by batch size: the default pair's F32 and F16 mains and the Q4_1 draft.

These costs bound what speculation can gain (docs/benchmarks.md §1): a step drafting k tokens costs about
k draft decodes plus one main decode of k + 1 tokens.

    .venv/bin/python bench/decode_costs.py [--reps 30]
    .venv/bin/python bench/decode_costs.py --by-position --reps 9   # by KV position, f32 vs f16 main KV
"""

from __future__ import annotations

import argparse
import statistics
import time

from tandem.engine.llama import Context, ContextParams, Model
from tandem.models.defaults import cache_dir, derive, draft_path, main_path

SIZES = (1, 2, 3, 5, 9, 17)
OFFSET = 60
"""Tokens already in the KV cache when each batch is decoded."""


def costs(model: Model, kv: str, sizes: tuple[int, ...], reps: int, prompt: list[int], *, offset: int = OFFSET,
          n_ctx: int = 1024) -> dict[int, float]:
    """Median milliseconds of one decode of n tokens (all logits) at position `offset`, for n in sizes."""
    ctx = Context(model, ContextParams(n_ctx=n_ctx, type_k=kv, type_v=kv))
    try:
        ctx.decode(prompt[:offset], 0, logits="none")
        out = {}
        for n in sizes:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                ctx.decode(prompt[offset:offset + n], offset, logits="all")
                times.append(time.perf_counter() - t0)
                ctx.rollback(offset)
            out[n] = 1000 * statistics.median(times)
        return out
    finally:
        ctx.close()


def _text(model: Model, repeats: int) -> list[int]:
    return model.tokenize("The quick brown fox jumps over the lazy dog. " * repeats, add_special=True,
                          parse_special=False)


POSITIONS = (200, 1000, 1800)
"""KV positions of the --by-position table (the window bench's early window and last 500 tokens)."""


def by_position(reps: int) -> None:
    """Milliseconds of one F32-main decode of 1 and 17 tokens at several KV positions, per main KV type: how
    much a long context slows verification (docs/benchmarks.md §3)."""
    main = Model(main_path())
    prompt = _text(main, 300)
    print("| main KV | tokens | " + " | ".join(f"position {p}" for p in POSITIONS) + " |")
    print("|---|---:|" + "---:|" * len(POSITIONS))
    for kv in ("f32", "f16"):
        by_pos = {pos: costs(main, kv, (1, 17), reps, prompt, offset=pos, n_ctx=4096) for pos in POSITIONS}
        for n in (1, 17):
            print(f"| {kv} | {n} | " + " | ".join(f"{by_pos[p][n]:.1f} ms" for p in POSITIONS) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--by-position", action="store_true",
                    help="instead: F32 main, 1 and 17 tokens at KV positions 200/1000/1800, f32 vs f16 KV")
    args = ap.parse_args()
    if args.by_position:
        by_position(args.reps)
        return
    draft = Model(draft_path())
    prompt = _text(draft, 12)
    print("| model | KV | " + " | ".join(f"{n} tok" for n in SIZES) + " |")
    print("|---|---|" + "---:|" * len(SIZES))
    for kind in ("F32", "F16"):
        path = cache_dir() / f"SmolLM2-135M-Instruct.{kind}.gguf"
        if not path.exists():
            derive(draft_path(), path, kind.lower())
        ms = costs(Model(path), "f32", SIZES, args.reps, prompt)
        print(f"| main {kind} | f32 | " + " | ".join(f"{ms[n]:.1f} ms" for n in SIZES) + " |")
    ms = costs(draft, "f16", (1, 2), args.reps, prompt)
    print("| draft Q4_1 | f16 | " + " | ".join(f"{ms[n]:.1f} ms" if n in ms else "" for n in SIZES) + " |")


if __name__ == "__main__":
    main()
