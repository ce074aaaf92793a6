"""Which main model makes the default pair? F16 and F32 mains derived from the packaged Q4_1 draft,
each benchmarked no-draft vs draft side by side on LM Studio's three prompts (greedy, 200 tokens).

    .venv/bin/python bench/pair_choice.py [--reps 2] [--mains f16 f32]
"""

import argparse
from pathlib import Path

from tandem.bench import BenchConfig, markdown, run_suite, summarize
from tandem.config import ModelOptions
from tandem.models.defaults import cache_dir, derive, draft_path
from tandem.prompts import lmstudio_prompts
from tandem.runtime import Runtime
from tandem.spec.generate import GenParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mains", nargs="+", default=["f16", "f32"])
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    draft = draft_path()
    configs = [BenchConfig("no-draft", {"use_draft": False}), BenchConfig("draft-model", {"use_draft": True})]
    for kind in args.mains:
        main_path = cache_dir() / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
        if not main_path.exists():
            derive(draft, main_path, kind)
        rt = Runtime(ModelOptions(model=str(main_path), draft=str(draft), ctx_size=2048), announce=print)
        prompts = {f"p{i}": rt.prompt(text=t) for i, t in enumerate(lmstudio_prompts())}
        rows = summarize(run_suite(rt, prompts, configs, GenParams(max_tokens=args.max_tokens), args.reps,
                                   log=lambda s: None))
        print(f"\n### {kind.upper()} main + Q4_1 draft\n")
        print(markdown([r for r in rows if r.prompt_id == "all"]))


if __name__ == "__main__":
    main()
