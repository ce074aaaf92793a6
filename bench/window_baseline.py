"""The no-draft baseline for bench/window_bench.py: the same 2,000-token greedy generation, main model only.

It separates what the main model loses as its own context grows (attention over more KV cells) from
what the draft window costs.

    .venv/bin/python bench/window_baseline.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from window_bench import DOCS, PROMPT, buckets, span  # noqa: E402

from tandem.config import ModelOptions  # noqa: E402
from tandem.runtime import Runtime  # noqa: E402
from tandem.spec.generate import GenParams, Token  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=DOCS / "window-baseline.json")
    args = ap.parse_args()
    rt = Runtime(ModelOptions(ctx_size=4096, draft="none"), announce=print)
    prompt = rt.prompt(text=PROMPT, raw=True)
    times, loads = [], []
    t0 = time.perf_counter()
    for ev in rt.generate(prompt, GenParams(max_tokens=args.tokens), use_draft=False):
        if isinstance(ev, Token):
            times.append(time.perf_counter())
            loads.append(os.getloadavg()[0])
    rows = buckets(times, loads, [], t0)
    early, late = span(rows, 100, 300), span(rows, len(times) - 500, len(times))
    print(f"no draft: {len(times)} tokens, tok/s 100-300 {early['tok_s']:.1f}, last 500 {late['tok_s']:.1f} "
          f"({late['tok_s'] / early['tok_s']:.2f}x)")
    args.out.write_text(json.dumps({"prompt": PROMPT, "rows": rows, "early": early, "last_500": late}, indent=1))


if __name__ == "__main__":
    main()
