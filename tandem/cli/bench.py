"""`tandem bench`: configurations side by side in one process; writes Markdown, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tandem.bench import BenchConfig, markdown, now_iso, run_suite, summarize, write_outputs
from tandem.cli.options import add_options, build
from tandem.cli.progress import load_progress
from tandem.config import ModelOptions, SpecOptions
from tandem.errors import BadInputError
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import GenParams

CONFIGS = {
    "no-draft": BenchConfig("no-draft", {"use_draft": False}),
    "draft-model": BenchConfig("draft-model", {"spec_type": "draft-model"}),
    "ngram": BenchConfig("ngram", {"spec_type": "ngram"}),
    "both": BenchConfig("both", {"spec_type": "both"}),
}
NEEDS_DRAFT = ("draft-model", "both")
"""Configurations that need a draft model (skipped, with a note, when it is --draft none)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=Path, default=DATA / "bench_prompts.jsonl",
                   help="JSONL file of {id, prompt} (default: the LM Studio prompts, a code edit, a creative one)")
    p.add_argument("--only", nargs="*", default=None, help="prompt ids to run (default: all)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to compare; no-draft is always included as the baseline")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per generation (default: 200)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every (prompt, config) (default: 3)")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default: bench/out)")
    add_options(p, ModelOptions)
    add_options(p, SpecOptions)


def load_prompts(path: Path, only: list[str] | None) -> dict[str, str]:
    if not path.exists():
        raise BadInputError(f"prompt file {path} does not exist", "pass --prompts FILE.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = {r["id"]: r["prompt"] for r in rows if only is None or r["id"] in only}
    if not prompts:
        raise BadInputError(f"no prompts selected from {path}", "check --only against the ids in the file")
    return prompts


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prompts = load_prompts(args.prompts, args.only)
    spec = build(SpecOptions, args)
    gp = GenParams(max_tokens=args.max_tokens, draft_max=spec.draft_max, draft_min=spec.draft_min,
                   draft_p_min=spec.draft_p_min, draft_policy=spec.draft_policy)
    opts = build(ModelOptions, args)
    with load_progress(console) as progress:
        rt = Runtime(opts, spec=spec, announce=console.print, progress=progress)
    names = [c for c in args.configs if c != "no-draft"]
    if rt.drafter is None and any(c in NEEDS_DRAFT for c in names):
        console.print(f"no draft model loaded: skipping {', '.join(c for c in names if c in NEEDS_DRAFT)}")
        names = [c for c in names if c not in NEEDS_DRAFT]
    configs = [CONFIGS["no-draft"]] + [CONFIGS[c] for c in names]
    tokens = {pid: rt.prompt(text=text) for pid, text in prompts.items()}
    samples = run_suite(rt, tokens, configs, gp, args.reps, log=lambda s: console.print(s, highlight=False))
    rows = summarize(samples)
    meta = {"when": now_iso(), "main": rt.main_model.name, "draft": rt.draft_name, "max_tokens": args.max_tokens,
            "reps": args.reps, "threads": rt.main.params.threads(), "spec": vars(spec),
            "title": f"{rt.main_model.name} + {rt.draft_name}"}
    paths = write_outputs(rows, samples, args.out, meta)
    print(markdown(rows))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
