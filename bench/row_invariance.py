"""How much a token's logits depend on its batch size, per main weight type (tandem.engine.exact.probe).

For each derived main type: the probe with Tandem's exact settings (weights not repacked) and with llama.cpp's
own (repacked). The tiled K-quant matmul is process-wide: run once as is (Tandem: off) and once with
GGML_CPU_TILED_MM=1 for stock llama.cpp.

    .venv/bin/python bench/row_invariance.py
    GGML_CPU_TILED_MM=1 .venv/bin/python bench/row_invariance.py
"""

from __future__ import annotations

import os

from tandem.engine import exact
from tandem.engine.llama import Context, ContextParams, Model
from tandem.models.defaults import cache_dir, derive, main_path

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def main() -> None:
    print(f"GGML_CPU_TILED_MM={os.environ.get('GGML_CPU_TILED_MM', '0 (Tandem sets it)')}")
    print("| main | weights repacked | lone row vs 2-row batch | batches of 3-17 rows vs 2 |")
    print("|---|---|---:|---:|")
    for kind in TYPES:
        path = main_path() if kind == "f32" else cache_dir() / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
        if not path.exists():
            derive(main_path(), path, kind)
        for repack in (False, True):
            model = Model(path, repack=repack)
            ctx = Context(model, ContextParams(n_ctx=256, exact=True))
            inv = exact.probe(ctx, exact.probe_tokens(ctx, exact.probe_length(17)))
            print(f"| {kind.upper()} | {'yes' if repack else 'no'} | {inv.single_row_diff:.1e} | {inv.multi_row_diff:.1e} |",
                  flush=True)
            ctx.close()
            model.close()


if __name__ == "__main__":
    main()
