"""`tandem` command: a thin dispatcher; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tandem.errors import TandemError

SUBCOMMANDS = {
    "run": "Generate once from a prompt, colouring the tokens the draft got accepted.",
    "serve": "Serve an OpenAI-compatible API with speculative decoding.",
    "bench": "Measure tokens/s with and without speculation, side by side (or what a MODE measures).",
    "models": "List models and their compatible drafts; set per-model defaults.",
    "fit": "Show the memory plan for a model and its draft before loading.",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description="Local LLM server with lossless speculative decoding.")
    parser.add_argument("--log-level", default="WARNING", help="Python log level (DEBUG shows per-step detail)")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, help_ in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"tandem.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tandem.cli.{name}":
                raise
            continue
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(modules[args.command].main(args) or 0)
    except TandemError as e:
        print(f"tandem {args.command}: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
