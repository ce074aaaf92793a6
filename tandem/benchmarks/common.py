"""What several benchmark modes share: which models to measure, the prompt files, and one generation's tokens
and speed."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from tandem.errors import BadInputError
from tandem.models.defaults import FTYPES, default_pair, draft_path
from tandem.spec.generate import Done, GenParams, Token
from tandem.testing.serve_process import ServeProcess


def add_model_arguments(p: argparse.ArgumentParser, types: Sequence[str] | None, *, draft: bool = True) -> None:
    """--types (main weight types derived from the packaged model; None: the mode measures one pair),
    --model, with `draft` --draft, and --threads."""
    if types is not None:
        p.add_argument("--types", nargs="+", default=list(types), choices=list(FTYPES), metavar="TYPE",
                       help=f"main model weight types ({', '.join(FTYPES)}), each derived once from the packaged "
                            f"SmolLM2-135M-Instruct and cached (default: {' '.join(types)})")
        p.add_argument("--model", nargs="+", type=Path, default=None, metavar="GGUF",
                       help="main model files to measure instead of --types")
    else:
        p.add_argument("--model", type=Path, default=None, metavar="GGUF",
                       help="main model (default: the embedded pair's F32 main)")
    if draft:
        p.add_argument("--draft", type=Path, default=None, metavar="GGUF",
                       help="draft model (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads; 0 means all cores (default: 0)")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _existing(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise BadInputError(f"{flag} {path} does not exist", f"pass an existing GGUF file to {flag}")
    return path


def add_concurrency_arguments(p: argparse.ArgumentParser, *, positions: int) -> None:
    """--concurrency, --max-tokens and --ctx-size (positions per request) of the modes that run N requests at once."""
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="N (default: 1 2 4 8)")
    p.add_argument("--max-tokens", type=positive_int, default=150, help="tokens per request (default: 150)")
    p.add_argument("--ctx-size", type=positive_int, default=positions,
                   help=f"positions per request (default: {positions})")


def mains(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(label, path) of each main model to measure: --model's files, else the derived --types."""
    if args.model:
        return [(p.stem, _existing(p, "--model")) for p in args.model]
    return [(kind.upper(), default_pair(kind, announce=_note).main) for kind in args.types]


def one_main(args: argparse.Namespace) -> Path:
    """The single main model of a mode that measures one pair."""
    return _existing(args.model, "--model") if args.model else default_pair(announce=_note).main


def draft_file(args: argparse.Namespace) -> Path:
    return _existing(args.draft, "--draft") if args.draft else draft_path()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_prompts(path: Path, only: list[str] | None) -> dict[str, str]:
    """{id: prompt} from a JSONL file of {id, prompt}, the ids in `only` (None: all)."""
    if not path.exists():
        raise BadInputError(f"prompt file {path} does not exist", "pass --prompts FILE.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = {r["id"]: r["prompt"] for r in rows if only is None or r["id"] in only}
    if not prompts:
        raise BadInputError(f"no prompts selected from {path}", "check --only against the ids in the file")
    return prompts


def generate_ids(rt, prompt: Sequence[int], gp: GenParams, **kwargs) -> tuple[list[int], float]:
    """One cold generation with Runtime.generate (keyword arguments passed on): its token ids and tokens/s."""
    ids, tps = [], 0.0
    for ev in rt.generate(prompt, dataclasses.replace(gp, cache_prompt=False), **kwargs):
        if isinstance(ev, Token):
            ids.append(ev.id)
        elif isinstance(ev, Done):
            tps = ev.stats.tokens_per_second
    return ids, tps


@contextlib.contextmanager
def tandem_server(main: Path, draft: Path, *, threads: int, ctx_size: int, parallel: int) -> Iterator[str]:
    """`tandem serve` in a process of its own on loopback, as a user runs it (and as the llama-server peer runs:
    the bench's client threads do not share its interpreter), with its models loaded; its URL. Stopped after."""
    server = ServeProcess(["--model", str(main), "--draft", str(draft), "--threads", str(threads),
                           "--ctx-size", str(ctx_size), "--parallel", str(parallel), "--port", "0"]).start()
    try:
        while httpx.get(f"{server.url}/health").json()["status"] == "loading":
            time.sleep(0.1)
        yield server.url
    finally:
        server.stop()
