"""The load-time payoff check per main weight type: the best speedup that full acceptance could give.

The figure is the best tokens/s ratio over plain (lone-row) decoding that any draft length could reach if
every draft token were accepted (tandem.spec.payoff). For each main model with the draft: the figure the
Runtime computed at load (what /health reports as model.draft_payoff, with a warning below 1), then the same
figure from a second timing of the costs it is computed from (tandem.runtime.calibrate_verify,
calibrate_draft and calibrate_lone), which shows how much it moves between loads, and those costs.
"""

from __future__ import annotations

import argparse

from tandem.benchmarks.common import add_model_arguments, draft_file, mains
from tandem.config import ModelOptions
from tandem.runtime import Runtime, calibrate_draft, calibrate_lone, calibrate_verify
from tandem.spec.payoff import best_case_speedup

HELP = "best-case speedup at full acceptance, per main weight type (the load-time check)"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, ("f32", "f16", "q8_0"))


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def main(args: argparse.Namespace) -> int:
    draft = draft_file(args)
    print("| main | best case at full acceptance (at load) | again, second timing | best draft length "
          "| draft token | plain main token (lone row) |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for label, path in mains(args):
        rt = Runtime(ModelOptions(model=str(path), draft=str(draft), threads=args.threads), announce=lambda _s: None)
        try:
            again, k, one, lone = None, None, None, None
            if rt.drafter is not None:
                tok = max(rt.main_model.bos, 0)
                verify = calibrate_verify(rt.main, tok)
                one = calibrate_draft(rt.drafter.ctx, max(rt.drafter.ctx.model.bos, 0)).get("one")
                rt.drafter.reset()
                lone = calibrate_lone(rt.main, tok)
                if verify and one is not None and lone is not None:
                    again, k = best_case_speedup(verify, one, lone, rt.spec.draft_max)
            print(f"| {label} | {_x(rt.payoff)} | {_x(again)} | {k if k is not None else 'n/a'} | {_ms(one)} "
                  f"| {_ms(lone)} |", flush=True)
        finally:
            rt.close()
    return 0
