"""The load-time payoff check (tandem/spec/payoff.py) on the default pair and on derived F16 and Q8_0 mains
with the packaged Q4_1 draft: the best tokens/s ratio over plain decoding at full acceptance, and the costs
it is computed from. docs/benchmarks.md section 6.

    .venv/bin/python bench/payoff.py [--types f32 f16 q8_0]
"""

from __future__ import annotations

import argparse
import logging

from exactness import main_file

from tandem.config import ModelOptions
from tandem.models.defaults import draft_path
from tandem.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for kind in args.types:
        rt = Runtime(ModelOptions(model=str(main_file(kind)), draft=str(draft_path())), announce=lambda _s: None)
        one = rt._draft_costs[rt.drafter.name]["one"]
        print(f"{kind}: payoff {rt.payoff:.2f}x (draft token {one * 1e3:.1f} ms; verify ms by batch size "
              f"{ {n: round(t * 1e3, 1) for n, t in rt._verify_costs.items()} })")
        rt.close()


if __name__ == "__main__":
    main()
