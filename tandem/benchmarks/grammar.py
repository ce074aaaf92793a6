"""Structured output: JSON-schema extraction with and without speculation, against free text, in one process.

The default pair and tandem/data/json_prompts.jsonl (a short text and the schema to extract it into, per line;
the prompt shows both). Configurations, interleaved per (prompt, repetition) in a rotating order so that CPU
noise falls on all alike:

  free          no grammar, no draft (plain decoding)
  json          the schema as a grammar, no draft, no forced drafts (constrained plain decoding)
  json+forced   the schema, the tokens it forces proposed as drafts, no draft model
  json+ngram    the schema, forced drafts, then n-gram (prompt lookup) drafts; no draft model (--spec-type ngram)
  json+model    the schema, forced drafts, then the draft model's (GenParams.grammar_ngram off)
  json+draft    the schema and the configured speculation (the default: forced drafts, then the n-gram
                continuation of a match in the prompt and output, else the draft model's)

Prints a Markdown table: median tokens/s, median per-(prompt, repetition) ratio to `json` and to `free`, the
share of outputs that parse as JSON with every required property, forced and drafted tokens accepted; and
whether every constrained configuration wrote the same text (greedy decoding is lossless under a grammar).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tandem.benchmarks.common import add_model_arguments, draft_file, one_main, positive_int
from tandem.config import ModelOptions
from tandem.errors import BadInputError
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token
from tandem.spec.grammar import Grammar
from tandem.spec.sampling import SamplingParams

HELP = "JSON-schema extraction: constrained with and without speculation vs free text"
"""One line for `tandem bench --help`."""

CONFIGS = ("free", "json", "json+forced", "json+ngram", "json+model", "json+draft")
_DRAFTED = {"json+ngram": "ngram", "json+model": None, "json+draft": None}
"""The configurations that speculate, and the spec_type each uses (None: the configured one)."""
PROMPT = ("Extract the information in the text below into a JSON object that matches this JSON schema. "
          "Answer with the JSON object only.\n\nSchema: {schema}\n\nText: {text}")


@dataclass
class _Tally:
    """One configuration's results over all prompts and repetitions."""

    tps: list[float] = field(default_factory=list)
    """Tokens per second of each generation (prompt excluded), in run order."""
    valid: int = 0
    """Outputs that parse as a JSON object holding every required property."""
    tokens: int = 0
    """Tokens generated."""
    forced: int = 0
    """Tokens forced by the grammar and accepted."""
    drafted: int = 0
    """Tokens the drafter (n-gram or draft model) proposed and the main model accepted."""
    texts: list[str] = field(default_factory=list)
    """Each output, in run order."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--prompts", type=Path, default=DATA / "json_prompts.jsonl",
                   help="JSONL file of {id, text, schema} (default: the packaged extraction set)")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N",
                   help="most tokens per generation (default: 256)")
    p.add_argument("--reps", type=positive_int, default=2, metavar="N", help="repetitions of every prompt (default: 2)")


def _load(path: Path) -> list[dict]:
    if not path.exists():
        raise BadInputError(f"prompt file {path} does not exist", "pass --prompts FILE.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or any({"id", "text", "schema"} - r.keys() for r in rows):
        raise BadInputError(f"{path} needs one {{id, text, schema}} object per line",
                            "see tandem/data/json_prompts.jsonl")
    return rows


def _valid(text: str, schema: dict) -> bool:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and set(schema.get("required", ())) <= obj.keys()


def _run(rt: Runtime, prompt: list[int], gp: GenParams, use_draft: bool,
         spec_type: str | None = None) -> tuple[str, Done, dict[str, int]]:
    """One generation: its text, its Done, and its tokens counted by source."""
    text, done, sources = "", None, {}
    for ev in rt.generate(prompt, gp, use_draft=use_draft, spec_type=spec_type):
        if isinstance(ev, Token):
            text += ev.text
            sources[ev.source] = sources.get(ev.source, 0) + 1
        elif isinstance(ev, Done):
            done, text = ev, text + ev.tail
    assert done is not None
    return text, done, sources


def main(args: argparse.Namespace) -> int:
    rows = _load(args.prompts)
    rt = Runtime(ModelOptions(model=str(one_main(args)), draft=str(draft_file(args)), threads=args.threads),
                 announce=lambda _s: None)
    base = GenParams(max_tokens=args.max_tokens, sampling=SamplingParams(temperature=0.0), cache_prompt=False)
    tally = {c: _Tally() for c in CONFIGS}
    try:
        for rep in range(args.reps):
            for i, row in enumerate(rows):
                prompt = rt.prompt(text=PROMPT.format(schema=json.dumps(row["schema"]), text=row["text"]))
                grammar = Grammar.json_schema(row["schema"])
                shift = (rep * len(rows) + i) % len(CONFIGS)
                for name in CONFIGS[shift:] + CONFIGS[:shift]:
                    gp = base if name == "free" else GenParams(**{**vars(base), "grammar": grammar,
                                                                  "forced_drafts": name != "json",
                                                                  "grammar_ngram": name != "json+model"})
                    text, done, sources = _run(rt, prompt, gp, use_draft=name in _DRAFTED,
                                               spec_type=_DRAFTED.get(name))
                    t, s = tally[name], done.stats
                    t.tps.append(s.tokens_per_second)
                    t.valid += _valid(text, row["schema"])
                    t.tokens += s.generated_tokens
                    t.texts.append(text)
                    t.forced += sources.get("grammar", 0)
                    t.drafted += sources.get("draft", 0)
    finally:
        rt.close()
    print(table(tally, len(rows) * args.reps))
    constrained = [name for name in CONFIGS if name != "free"]
    same = all(tally[name].texts == tally["json"].texts for name in constrained)
    print(f"\nconstrained outputs equal across {', '.join(constrained)}: {'yes' if same else 'NO'}")
    for name in constrained:  # where not: which generation, and where it left json's text
        for j, (a, b) in enumerate(zip(tally["json"].texts, tally[name].texts)):
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  {name}, {rows[j % len(rows)]['id']} (rep {j // len(rows) + 1}): from character {at}, "
                      f"json {a[max(0, at - 20):at + 20]!r}, {name} {b[max(0, at - 20):at + 20]!r}")
    return 0


def table(tally: dict[str, _Tally], n: int) -> str:
    """The Markdown table of one run."""
    med = statistics.median

    def ratio(a: str, b: str) -> str:
        return f"{med(x / y for x, y in zip(tally[a].tps, tally[b].tps) if y):.2f}x"

    lines = ["| config | tok/s (median) | vs json | vs free | valid JSON | tokens | forced accepted "
             "| drafted accepted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in tally.items():
        lines.append(f"| {name} | {med(t.tps):.1f} | {ratio(name, 'json')} | {ratio(name, 'free')} | "
                     f"{t.valid}/{n} | {t.tokens} | {t.forced} | {t.drafted} |")
    return "\n".join(lines)
