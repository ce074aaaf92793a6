"""Does the policy gain from knowing what a plain step's spare-row guess yields? Side by side, one run.

Three draft-model configurations on the bench prompts, interleaved (order reversed every other repetition):
  aware    the adaptive policy counts a plain step as 1 + the chance that its guess is right (Tandem's default)
  unaware  the same policy counting 1 token a plain step, guesses still made
  noguess  no spare-row guesses (--no-spare-guess)
and the median per-(prompt, repetition) tok/s ratios between them.

    .venv/bin/python bench/guess_policy_ab.py [--model MAIN.gguf --draft DRAFT.gguf] [--reps 3]
"""

from __future__ import annotations

import argparse
import collections
import statistics

from tandem.bench import BenchConfig, measure
from tandem.cli.bench import load_prompts
from tandem.config import ModelOptions, SpecOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec import policy
from tandem.spec.generate import GenParams

CONFIGS = (BenchConfig("aware", {"spec_type": "draft-model"}), BenchConfig("unaware", {"spec_type": "draft-model"}),
           BenchConfig("noguess", {"spec_type": "draft-model"}, {"spare_guess": False}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    aware = {"on": True}
    counted = policy.AdaptivePolicy.plain_tokens
    policy.AdaptivePolicy.plain_tokens = lambda self: counted(self) if aware["on"] else 1.0  # the "unaware" arm
    opts = ModelOptions(**{k: v for k, v in (("model", args.model), ("draft", args.draft)) if v})
    spec = SpecOptions()
    rt = Runtime(opts, spec=spec, announce=lambda _s: None)
    gp = GenParams(max_tokens=args.max_tokens, draft_max=spec.draft_max)
    prompts = {pid: rt.prompt(text=t) for pid, t in load_prompts(DATA / "bench_prompts.jsonl", None).items()}
    runs: dict[tuple[str, int], dict] = collections.defaultdict(dict)
    for rep in range(args.reps):
        for pid, prompt in prompts.items():
            for cfg in (CONFIGS if rep % 2 == 0 else CONFIGS[::-1]):
                aware["on"] = cfg.name == "aware"
                s = measure(rt, prompt, gp, cfg, pid, rep)
                runs[(pid, rep)][cfg.name] = s
                print(f"rep {rep} {pid:>12} {cfg.name:>8}: {s.tokens_per_second:6.1f} tok/s, "
                      f"{s.draft_steps} drafting / {s.plain_steps} plain steps", flush=True)
    for a, b in (("aware", "unaware"), ("aware", "noguess"), ("unaware", "noguess")):
        r = [v[a].tokens_per_second / v[b].tokens_per_second for v in runs.values()]
        print(f"{a} / {b}: median {statistics.median(r):.3f}x  ({', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    main()
