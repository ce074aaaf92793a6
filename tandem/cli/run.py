"""`tandem run`: one generation on the terminal; accepted draft tokens in green (spare-row guesses in cyan,
tokens a grammar forced in magenta), then a stats line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from tandem.cli.options import add_options, build, explicit
from tandem.cli.progress import load_progress
from tandem import chat
from tandem.config import ModelOptions, PenaltyOptions, RegistryOptions, SamplingOptions, SpecOptions
from tandem.errors import BadInputError
from tandem.models.library import Library
from tandem.engine.llama import Model
from tandem.runtime import Runtime, chat_format, resolve_paths
from tandem.spec.generate import Done, GenParams, Token
from tandem.spec.grammar import Grammar
from tandem.spec.logprobs import MAX_TOP
from tandem.spec.penalties import penalty_processors
from tandem.spec.processors import Processors
from tandem.spec.sampling import SamplingParams

SOURCE_STYLES = {"draft": "green", "guess": "cyan", "grammar": "magenta"}
"""Terminal style of a token by its source (main-model tokens are unstyled)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")
    p.add_argument("--no-color", action="store_true", help="plain text output")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the prompt the model would get (the chat template applied; with --raw, the text as "
                        "is) and exit without generating; a template fallback is reported on standard error")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100 to 100) to token ID's logit (repeatable; OpenAI's logit_bias)")
    p.add_argument("--logprobs", type=int, metavar="N",
                   help=f"with --json: each token's log probability and the N (0-{MAX_TOP}) most likely tokens")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this JSON Schema")
    p.add_argument("--grammar", metavar="FILE", help="constrain the output to this GBNF (or Lark) grammar")
    add_options(p, ModelOptions)
    add_options(p, SpecOptions)
    add_options(p, SamplingOptions)
    add_options(p, PenaltyOptions)
    add_options(p, RegistryOptions)


def main(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise BadInputError("the prompt is empty", "pass --prompt TEXT or pipe text on standard input")
    err = Console(stderr=True, no_color=args.no_color)
    sampling = SamplingParams(**vars(build(SamplingOptions, args)))
    lib = Library.open(build(RegistryOptions, args), extra=(args.model, args.draft))
    models, spec = lib.resolve(build(ModelOptions, args), build(SpecOptions, args), explicit(args))
    if args.show_prompt:
        return _show_prompt(models, prompt, raw=args.raw, err=err)
    processors = Processors(penalty_processors(**vars(build(PenaltyOptions, args)),
                                               logit_bias=_logit_bias(args.logit_bias)))
    gp = GenParams(max_tokens=args.max_tokens, sampling=sampling, stop=tuple(args.stop), grammar=_grammar(args),
                   draft_max=spec.draft_max, draft_min=spec.draft_min, draft_p_min=spec.draft_p_min,
                   draft_policy=spec.draft_policy, spare_guess=spec.spare_guess, processors=processors,
                   logprobs=args.logprobs)
    with load_progress(err, quiet=args.json) as progress:
        rt = Runtime(models, spec=spec, announce=lambda s: err.print(s), progress=progress)
    tokens = rt.prompt(text=prompt, raw=args.raw)
    out = Console(no_color=args.no_color, highlight=False, soft_wrap=True)
    records = []
    for ev in rt.generate(tokens, gp):
        if isinstance(ev, Done):
            stats = ev.stats
            if ev.tail:
                records.append({"id": -1, "text": ev.tail, "source": "main"})
                if not args.json:
                    out.print(ev.tail, end="")
            break
        records.append({"id": ev.id, "text": ev.text, "source": ev.source, **_logprob_fields(ev)})
        if not args.json:
            out.print(Text(ev.text, style=SOURCE_STYLES.get(ev.source, "")), end="")
    if args.json:
        print(json.dumps({"text": "".join(r["text"] for r in records),
                          "tokens": [r for r in records if r["id"] >= 0], "stats": stats.to_dict()}))
        return 0
    out.print()
    err.print(f"[dim]{stats.tokens_per_second:.1f} tok/s · {stats.generated_tokens} tokens · "
              f"acceptance {stats.acceptance_rate:.0%} · drafted {stats.drafted} / accepted {stats.accepted} / "
              f"rejected {stats.rejected} / ignored {stats.ignored} · draft {stats.draft_model or 'none'} · "
              + (f"guesses {stats.guesses_accepted} of {stats.guessed} right · " if stats.guessed else "") +
              f"stop {stats.stop_reason}[/dim]")
    return 0


def _show_prompt(models: ModelOptions, prompt: str, *, raw: bool, err: Console) -> int:
    """Print the prompt text the main model would get (only its weights are loaded: no draft, no context)."""
    main = Model(resolve_paths(models, announce=lambda s: err.print(s)).main)
    try:
        fmt = chat_format(main, models.chat_template)
        if fmt.warning and not raw:
            err.print(f"[yellow]warning:[/yellow] {fmt.warning}")
        text = prompt if raw else chat.prompt_text(fmt, [{"role": "user", "content": prompt}])
    finally:
        main.close()
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _logit_bias(items: list[str]) -> dict[str, object]:
    """--logit-bias ID=BIAS flags as OpenAI's logit_bias mapping (its values checked by LogitBias)."""
    out: dict[str, object] = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            out[token.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise BadInputError(f"--logit-bias {item!r} is not ID=BIAS", "e.g. --logit-bias 50256=-100",
                                param="logit_bias")
    return out


def _logprob_fields(ev: Token) -> dict[str, object]:
    """A token's log probability and the most likely tokens at its position, for --json with --logprobs."""
    if ev.logprob is None:
        return {}
    return {"logprob": ev.logprob.chosen.logprob,
            "top_logprobs": [{"id": t.token, "text": t.bytes.decode("utf-8", errors="replace"), "logprob": t.logprob}
                             for t in ev.logprob.top]}


def _grammar(args: argparse.Namespace) -> Grammar | None:
    """The constraint --json-schema or --grammar names (None: free text)."""
    if args.json_schema and args.grammar:
        raise BadInputError("--json-schema and --grammar both constrain the output", "pass only one of them",
                            param="grammar")
    name, path = ("json_schema", args.json_schema) if args.json_schema else ("grammar", args.grammar)
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e.strerror}", "pass the path of a readable text file",
                            param=name) from e
    return Grammar.json_schema(text, param=name) if name == "json_schema" else Grammar.gbnf(text, param=name)
