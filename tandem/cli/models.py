"""`tandem models`: the registry as a table (or JSON), why a draft is refused, and per-model defaults.

    tandem models                         table of every model, its compatible drafts and default draft
    tandem models --json                  the same for machines
    tandem models --why MAIN              every other model as a draft for MAIN: ok, or why not
    tandem models set-draft MAIN DRAFT    MAIN's default draft (`none` clears it)
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from tandem.cli.options import add_options, build
from tandem.config import RegistryOptions
from tandem.errors import BadInputError
from tandem.models.library import Library

ACTIONS = ("list", "set-draft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=ACTIONS,
                   help="list (default) or set-draft MAIN DRAFT (DRAFT 'none' clears the default)")
    p.add_argument("names", nargs="*", metavar="MODEL", help="set-draft: the main model id, then the draft id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--why", metavar="MAIN", help="show every other model as a draft for MAIN, with the reason "
                                                 "each refused one cannot draft")
    add_options(p, RegistryOptions)


def main(args: argparse.Namespace) -> int:
    lib = Library.open(build(RegistryOptions, args))
    if args.action == "set-draft":
        return _set_draft(lib, args)
    if args.names:
        raise BadInputError(f"unexpected argument {args.names[0]!r}",
                            "use `tandem models`, `tandem models --why MAIN` or `tandem models set-draft MAIN DRAFT`")
    if args.why:
        return _why(lib, args.why, as_json=args.json)
    if args.json:
        print(json.dumps(listing(lib), indent=2))
        return 0
    _table(lib)
    return 0


def listing(lib: Library) -> dict:
    """The --json object: where models come from, each model described, and the files that were skipped."""
    reg = lib.registry
    return {"models_dir": str(reg.config.models_dir), "settings_file": str(lib.settings.path),
            "models": [lib.describe(e) for e in reg], "skipped": reg.broken}


def _set_draft(lib: Library, args: argparse.Namespace) -> int:
    if len(args.names) != 2:
        raise BadInputError(f"set-draft takes a main model and a draft, got {len(args.names)} name(s)",
                            "run `tandem models set-draft MAIN DRAFT` (DRAFT `none` clears it); "
                            "`tandem models` lists the ids")
    main, draft = lib.set_draft(*args.names)
    if args.json:
        print(json.dumps({"model": main.id, "default_draft": draft.id if draft else None,
                          "settings_file": str(lib.settings.path)}))
    elif draft is None:
        print(f"{main.id}: no default draft (wrote {lib.settings.path})")
    else:
        print(f"{main.id}: default draft {draft.id} (wrote {lib.settings.path})")
    return 0


def _why(lib: Library, name: str, *, as_json: bool) -> int:
    reg = lib.registry
    main = reg.find(name)
    pairs = reg.pairings(main)
    if as_json:
        print(json.dumps({"model": main.id, "drafts": [{"draft": p.draft, "compatible": p.reason is None,
                                                        "reason": p.reason} for p in pairs]}, indent=2))
        return 0
    table = Table(title=f"drafts for {main.id}", title_justify="left")
    table.add_column("draft")
    table.add_column("usable")
    table.add_column("why not", overflow="fold")
    for p in sorted(pairs, key=lambda p: (p.reason is not None, p.draft)):
        table.add_row(p.draft, "yes" if p.reason is None else "no", p.reason or "")
    _console().print(table)
    return 0


def _table(lib: Library) -> None:
    reg = lib.registry
    console = _console()
    if not len(reg):
        console.print(f"No models found. Put *.gguf files in {reg.config.models_dir} (or pass --models-dir).")
    else:
        table = Table(title=f"models in {reg.config.models_dir} (+ built-in)", title_justify="left")
        for col, just in (("id", "left"), ("arch", "left"), ("quant", "left"), ("params", "right"),
                          ("size", "right"), ("ctx", "right"), ("compatible drafts", "left"),
                          ("default draft", "left")):
            table.add_column(col, justify=just, overflow="fold", no_wrap=col == "id")  # type: ignore[arg-type]
        for e in reg:
            d = lib.describe(e)
            f = e.facts
            table.add_row(e.id, f.arch, f.quantization, human(f.n_params), human(e.size_bytes, "B"),
                          str(f.context_length or "?"), ", ".join(d["compatible_drafts"]) or "-",
                          d["default_draft"] or "-")
        console.print(table)
        console.print("[dim]`tandem models --why MAIN` says why the other models cannot draft for MAIN.[/dim]")
    for path, why in reg.broken.items():
        console.print(f"[yellow]skipped[/yellow] {path}: {why}", highlight=False)


def _console() -> Console:
    """The terminal's width on a terminal; wide enough for whole rows when piped (grep, less -S)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def human(n: int, unit: str = "") -> str:
    """1234567 -> 1.2M (3 significant figures)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.3g}{suffix}{unit}"
    return f"{n}{unit}"
