"""`tandem bench`: configurations side by side in one process (Markdown, JSON and a PNG plot), or one of the
modes of tandem.benchmarks (`tandem bench MODE`)."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from tandem.benchmarks import MODES, module_name
from tandem.benchmarks.common import load_prompts
from tandem.benchmarks.compare import PEER, BenchConfig, markdown, now_iso, run_suite, summarize, versus, write_outputs
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.cli.options import add_options, build
from tandem.cli.progress import load_progress
from tandem.config import ModelOptions, SpecOptions
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import GenParams

CONFIGS = {
    "no-draft": BenchConfig("no-draft", {"use_draft": False}),
    "no-draft-lone": BenchConfig("no-draft-lone", {"use_draft": False, "exact": False}),
    "no-draft-noguess": BenchConfig("no-draft-noguess", {"use_draft": False}, {"spare_guess": False}),
    "draft-model-noguess": BenchConfig("draft-model-noguess", {"spec_type": "draft-model"}, {"spare_guess": False}),
    "default": BenchConfig("default", {}),
    "draft-model": BenchConfig("draft-model", {"spec_type": "draft-model"}),
    "ngram": BenchConfig("ngram", {"spec_type": "ngram"}),
    "both": BenchConfig("both", {"spec_type": "both"}),
}
DEFAULT_CONFIGS = ("no-draft", "default", "draft-model", "ngram", "both")
"""What `tandem bench` compares unless --configs says otherwise."""
NEEDS_DRAFT = ("draft-model", "draft-model-noguess", "both")
"""Configurations that need a draft model (skipped, with a note, when it is --draft none)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # a mode's options come after MODE: no prefix of them may match an option above
    p.usage = ("%(prog)s [OPTIONS]            compare configurations side by side (the options below)\n"
               "       %(prog)s MODE [OPTIONS]       one of the modes listed at the end")
    p.add_argument("--prompts", type=Path, default=DATA / "bench_prompts.jsonl",
                   help="JSONL file of {id, prompt} (default: the LM Studio prompts, a code edit, a creative one)")
    p.add_argument("--only", nargs="*", default=None, help="prompt ids to run (default: all)")
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c in DEFAULT_CONFIGS], choices=list(CONFIGS),
                   help="configurations to compare; no-draft is always included as the baseline; no-draft-lone "
                        "decodes lone tokens alone (the fastest plain decoding, what llama.cpp does; see --exact); "
                        "*-noguess: without spare-row guesses (--no-spare-guess); default: what a request without "
                        "draft_model gets (the configured speculation, or none where the draft cannot pay: "
                        "--pause-slow-draft); draft-model: the draft model always")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per generation (default: 200)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every (prompt, config) (default: 3)")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default: bench/out)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama.cpp's llama-server binary at PATH as a peer, on loopback with the same models "
                        "and settings: without a draft, with the draft (llama-server-draft) and with ngram-mod "
                        "(llama-server-ngram), for the configs chosen")
    p.add_argument("--peer-draft", type=Path, default=None, metavar="PATH",
                   help="the draft llama-server-draft uses (default: --draft when it shares the main model's "
                        "vocabulary; llama-server cannot draft across vocabularies)")
    add_options(p, ModelOptions)
    add_options(p, SpecOptions)
    modes = p.add_subparsers(dest="mode", metavar="MODE", title="modes", prog=p.prog,
                             description="Without a MODE, tandem bench compares the configurations above side by "
                                         "side. `tandem bench MODE --help` lists a mode's own options.")
    for name in MODES:
        mod = importlib.import_module(module_name(name))
        mode = modes.add_parser(name, help=mod.HELP, description=mod.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(mode)
        mode.set_defaults(mode_main=mod.main)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "mode", None):
        return int(args.mode_main(args) or 0)
    return compare(args)


def compare(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prompts = load_prompts(args.prompts, args.only)
    spec = build(SpecOptions, args)
    gp = GenParams(max_tokens=args.max_tokens, draft_max=spec.draft_max, draft_min=spec.draft_min,
                   draft_p_min=spec.draft_p_min, draft_policy=spec.draft_policy,
                   spare_guess=spec.spare_guess)
    opts = build(ModelOptions, args)
    with load_progress(console) as progress:
        rt = Runtime(opts, spec=spec, announce=console.print, progress=progress)
    names = [c for c in args.configs if c != "no-draft"]
    if rt.drafter is None and any(c in NEEDS_DRAFT for c in names):
        console.print(f"no draft model loaded: skipping {', '.join(c for c in names if c in NEEDS_DRAFT)}")
        names = [c for c in names if c not in NEEDS_DRAFT]
    configs = [CONFIGS["no-draft"]] + [CONFIGS[c] for c in names]
    peers = start_peers(args.llama_server, rt, spec, names, console, args.peer_draft) if args.llama_server else []
    try:
        configs += [BenchConfig(p.name, peer=p) for p in peers]
        tokens = {pid: rt.prompt(text=text) for pid, text in prompts.items()}
        samples = run_suite(rt, tokens, configs, gp, args.reps, log=lambda s: console.print(s, highlight=False))
    finally:
        for p in peers:
            p.close()
    rows = summarize(samples)
    meta = {"when": now_iso(), "main": rt.main_model.name, "draft": rt.draft_name, "max_tokens": args.max_tokens,
            "reps": args.reps, "threads": rt.main.params.threads(), "spec": vars(spec),
            "title": f"{rt.main_model.name} + {rt.draft_name}"}
    paths = write_outputs(rows, samples, args.out, meta)
    print(markdown(rows))
    for mine in ("draft-model", "ngram", "both"):
        r = versus(samples, mine, "no-draft-lone")
        if r is not None:
            print(f"\nTandem {mine} vs no-draft-lone (lone tokens decoded alone, as llama.cpp does: the fastest "
                  f"plain decoding): {r:.2f}x tokens/s, {versus(samples, mine, 'no-draft-lone', end_to_end=True):.2f}x "
                  "end to end")
    for mine, theirs in (("draft-model", f"{PEER}-draft"), ("ngram", f"{PEER}-ngram")):
        r = versus(samples, mine, theirs)
        if r is not None:
            e2e = versus(samples, mine, theirs, end_to_end=True)
            print(f"\nTandem {mine} vs {theirs}: {r:.2f}x tokens/s, {e2e:.2f}x end to end (prompt included; "
                  "medians over prompts and reps)")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def start_peers(binary: Path, rt: Runtime, spec: SpecOptions, names: list[str], console: Console,
                peer_draft: Path | None = None) -> list:
    """llama-server without a draft, and with each of Tandem's speculative configs it has a counterpart for: the
    draft model one with `peer_draft`, else Tandem's draft when llama-server can use it (the same vocabulary)."""
    o = rt.opts
    base = PeerSettings(main=rt.main_model.path, ctx_size=o.ctx_size, threads=rt.main.params.threads(),
                        cache_type_k=o.cache_type_k, cache_type_v=o.cache_type_v, draft_max=spec.draft_max,
                        draft_min=spec.draft_min, draft_p_min=spec.draft_p_min)
    wanted = [(PEER, base)]
    if peer_draft is None and rt.drafter is not None and rt.drafter.translator is None:
        peer_draft = rt.drafter.ctx.model.path
    if "draft-model" in names and peer_draft is not None:
        wanted.append((f"{PEER}-draft", replace(base, draft=peer_draft)))
    if "ngram" in names:
        wanted.append((f"{PEER}-ngram", replace(base, spec_type="ngram-mod")))
    peers = []
    try:
        for name, settings in wanted:
            console.print(f"starting {name} ({binary})")
            peer = LlamaServerPeer(binary, settings, name=name)
            peers.append(peer)
            peer.start()
    except BaseException:
        for p in peers:
            p.close()
        raise
    return peers
