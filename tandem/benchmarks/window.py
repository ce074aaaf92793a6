"""Sliding draft window: tokens/s and acceptance per 100 tokens of one long generation, by draft context.

The pair at main context --ctx-size, the same long greedy generation with each setting (each --draft-ctx,
and no draft), repeated: settings interleaved, their order reversed every other repetition, each setting's
Runtime loaded once and kept (as a server keeps it) and warmed up with an untimed generation. The default
(adaptive) draft policy runs with the Runtime's cost models, as in `serve`. Besides tok/s it records the
milliseconds spent inside the main's and the draft's llama_decode per generated token, so that a late slowdown
splits into the draft window's part and the main model's own. Writes OUT.json (every number) and OUT.png
(median tokens/s and acceptance per 100-token window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.benchmarks.common import add_model_arguments, draft_file, one_main, positive_int
from tandem.config import ModelOptions, SpecOptions
from tandem.errors import BadInputError
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.processors import NONE, Processors
from tandem.spec.sampling import SamplingParams
from tandem.spec.verify import DraftProposal

HELP = "tokens/s and acceptance along a long generation, by draft context (sliding window)"
"""One line for `tandem bench --help`."""

BUCKET = 100
LATE = 500
"""The late span: the last LATE tokens, against tokens 100-300."""
MIN_TOKENS = 600
# A raw (untemplated) opening that a small model continues instead of closing: no EOS in 2,000 greedy tokens.
PROMPT = ("The following is the complete text of a very long novel about a lighthouse keeper and the "
          "strange ship she sees one winter night.\n\nChapter 1\n\n")


@dataclass
class Recorder:
    """Wraps a ModelDrafter; notes how many tokens it drafted at which point of the output."""

    inner: ModelDrafter
    n_prompt: int
    steps: list[list[int]] = field(default_factory=list)
    """Per drafting step: [tokens generated before it, tokens drafted, drafts accepted (filled in later)]."""

    @property
    def name(self) -> str:
        return self.inner.name

    def reset(self, history: Sequence[int] | None = None) -> None:
        self.inner.reset(history)

    def prefill(self, history: Sequence[int]) -> None:
        self.inner.prefill(history)

    def kv_cells(self, n_history: int) -> int:
        return self.inner.kv_cells(n_history)

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        proposal = self.inner.propose(history, max_tokens, sp, rng, p_min, processors)
        self.steps.append([len(history) - self.n_prompt, len(proposal.tokens), 0])
        return proposal

    def note(self, token: Token) -> None:
        """Credit an accepted draft token to the step that drafted it."""
        if token.source == "draft":
            self.steps[-1][2] += 1


def buckets(times: list[float], loads: list[float], steps: list[list[int]], t0: float,
            clocks: list[tuple[float, float, int]]) -> list[dict]:
    """Tokens/s, acceptance (of the steps starting in it) and where the time went, for each full 100-token
    window of the output. `clocks[i]`: (main decode seconds, draft decode seconds, draft decode calls) so far
    when token i came out, counted from the generation's start."""
    out = []
    for b in range(len(times) // BUCKET):
        lo, hi = b * BUCKET, (b + 1) * BUCKET
        start = t0 if lo == 0 else times[lo - 1]
        drafted = sum(n for at, n, _ in steps if lo <= at < hi)
        accepted = sum(a for at, _, a in steps if lo <= at < hi)
        (m0, d0, c0), (m1, d1, c1) = (0.0, 0.0, 0) if lo == 0 else clocks[lo - 1], clocks[hi - 1]
        out.append({"from": lo, "to": hi, "tok_s": BUCKET / (times[hi - 1] - start),
                    "drafted": drafted, "accepted": accepted, "draft_steps": sum(lo <= at < hi for at, _, _ in steps),
                    "acceptance": accepted / drafted if drafted else None, "loadavg": loads[hi - 1],
                    "main_s": m1 - m0, "draft_s": d1 - d0, "draft_calls": c1 - c0})
    return out


def span(rows: list[dict], lo: int, hi: int) -> dict:
    """Tokens/s, acceptance and decode milliseconds over the windows in [lo, hi). The draft's milliseconds per
    decode call measure the machine's speed too: a windowed draft does the same work per call all along."""
    sel = [r for r in rows if lo <= r["from"] and r["to"] <= hi]
    if not sel:
        return {"tok_s": float("nan"), "acceptance": float("nan"), "main_ms_per_token": float("nan"),
                "draft_ms_per_token": float("nan"), "draft_ms_per_call": None}
    secs = sum(BUCKET / r["tok_s"] for r in sel)
    drafted = sum(r["drafted"] for r in sel)
    n = len(sel) * BUCKET
    calls = sum(r["draft_calls"] for r in sel)
    return {"tok_s": n / secs, "acceptance": sum(r["accepted"] for r in sel) / max(drafted, 1),
            "main_ms_per_token": 1000 * sum(r["main_s"] for r in sel) / n,
            "draft_ms_per_token": 1000 * sum(r["draft_s"] for r in sel) / n,
            "draft_ms_per_call": 1000 * sum(r["draft_s"] for r in sel) / calls if calls else None}


def distinct_4grams(ids: list[int]) -> float:
    """Share of distinct 4-grams: near 0 means the text loops."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / max(len(grams), 1)


@dataclass
class Setting:
    """One column of the bench: a Runtime (kept across repetitions) and how to generate with it."""

    label: str
    """What the plot and table call it."""
    draft_ctx: int | None
    """Draft context; None: no draft."""
    rt: Runtime
    """Loaded once."""


def load(opts: ModelOptions, draft_ctx: int | None) -> Setting:
    """The pair of `opts` with this draft context (None: without the draft, decoding lone rows as --draft none)."""
    if draft_ctx is None:
        return Setting("no draft", None, Runtime(dataclasses.replace(opts, draft="none", exact=False), announce=_note))
    rt = Runtime(dataclasses.replace(opts, ctx_size_draft=draft_ctx), announce=_note)
    if rt.drafter is None:
        raise BadInputError(f"the draft did not load: {rt.draft_status}", "pass a draft that serves this main model")
    return Setting(f"draft ctx {draft_ctx}", draft_ctx, rt)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def one_run(s: Setting, n_tokens: int, policy: str) -> dict:
    """Generate n_tokens greedily; return per-window and summary numbers."""
    rt = s.rt
    prompt = rt.prompt(text=PROMPT, raw=True)
    spec = SpecOptions()
    gp = GenParams(max_tokens=n_tokens, draft_max=spec.draft_max, draft_min=spec.draft_min,
                   draft_p_min=spec.draft_p_min, draft_policy=policy)
    rec = Recorder(rt.drafter, len(prompt)) if rt.drafter is not None else None
    processed0 = rt.drafter.ctx.tokens_processed if rt.drafter is not None else 0
    shifts0 = rt.drafter.shifts if rt.drafter is not None else 0
    times: list[float] = []
    loads: list[float] = []
    ids: list[int] = []
    clocks: list[tuple[float, float, int]] = []
    main, draft = rt.main, (rt.drafter.ctx if rt.drafter is not None else None)
    base = (main.decode_seconds, draft.decode_seconds if draft else 0.0, draft.decode_calls if draft else 0)
    # The Runtime's cost models (calibrated once, then learnt online) steer an adaptive policy, as in `serve`.
    costs = (lambda _d, key: rt.cost(rt.drafter, key)) if rt.drafter is not None else None
    t0 = time.perf_counter()
    for ev in generate(rt.main, prompt, gp, rec, costs=costs):
        if isinstance(ev, Token):
            times.append(time.perf_counter())
            loads.append(os.getloadavg()[0])
            ids.append(ev.id)
            clocks.append((main.decode_seconds - base[0], (draft.decode_seconds if draft else 0.0) - base[1],
                           (draft.decode_calls if draft else 0) - base[2]))
            if rec is not None:
                rec.note(ev)
        elif isinstance(ev, Done):
            st = ev.stats
    rows = buckets(times, loads, rec.steps if rec else [], t0, clocks)
    out = {"generated": st.generated_tokens, "stop_reason": st.stop_reason, "prompt_tokens": st.prompt_tokens,
           "seconds": times[-1] - t0, "early": span(rows, 100, 300), "last_500": span(rows, n_tokens - LATE, n_tokens),
           "buckets": rows, "ids_hash": hash(tuple(ids)), "distinct_4grams_last_500": distinct_4grams(ids[-LATE:]),
           "text_tail": rt.main_model.detokenize(ids[-60:])}
    out["ratio"] = out["last_500"]["tok_s"] / out["early"]["tok_s"]
    if rt.drafter is not None:
        processed = rt.drafter.ctx.tokens_processed - processed0
        out.update(acceptance=st.acceptance_rate, drafted=st.drafted, accepted=st.accepted, rejected=st.rejected,
                   shifts=rt.drafter.shifts - shifts0, draft_tokens_processed=processed,
                   draft_cost_ratio=processed / (st.prompt_tokens + st.generated_tokens + st.rejected))
    return out


def where_time_went(r: dict) -> str:
    """Decode milliseconds per generated token, tokens 100-300 -> last 500, main and draft apart."""
    e, late = r["early"], r["last_500"]
    out = f"main ms/token {e['main_ms_per_token']:.1f} -> {late['main_ms_per_token']:.1f}"
    if e["draft_ms_per_call"] is not None and late["draft_ms_per_call"] is not None:
        out += (f", draft ms/token {e['draft_ms_per_token']:.1f} -> {late['draft_ms_per_token']:.1f}"
                f" (ms/call {e['draft_ms_per_call']:.1f} -> {late['draft_ms_per_call']:.1f})")
    return out


def main_growth(r: dict) -> dict:
    """What the main model's own slowdown does to one run's late/early ratio.

    `main_growth_ms`: how many more milliseconds of main-model decoding each generated token costs in the last
    500 tokens than in tokens 100-300 (attention over a longer KV cache; the draft window cannot change it).
    `ratio_if_main_flat`: the run's late/early tok/s ratio with that growth taken out of the late time."""
    e, late = r["early"], r["last_500"]
    growth = late["main_ms_per_token"] - e["main_ms_per_token"]
    early_ms, late_ms = 1000 / e["tok_s"], 1000 / late["tok_s"]
    return {"main_growth_ms": growth, "ratio_if_main_flat": early_ms / (late_ms - growth)}


def summarize(s: Setting, runs: list[dict]) -> dict:
    """Medians over repetitions: per-window tok/s (from median seconds) and the late/early ratio."""
    n = min(len(r["buckets"]) for r in runs)
    med_rows = []
    for b in range(n):
        rows = [r["buckets"][b] for r in runs]
        secs = statistics.median(BUCKET / x["tok_s"] for x in rows)
        drafted = sum(x["drafted"] for x in rows)
        med_rows.append({"from": rows[0]["from"], "to": rows[0]["to"], "tok_s": BUCKET / secs,
                         "acceptance": sum(x["accepted"] for x in rows) / drafted if drafted else None})
    out = {"label": s.label, "draft_ctx": s.draft_ctx, "reps": len(runs),
           "ratio_median": statistics.median(r["ratio"] for r in runs), "ratios": [r["ratio"] for r in runs],
           "early_tok_s": statistics.median(r["early"]["tok_s"] for r in runs),
           "last_500_tok_s": statistics.median(r["last_500"]["tok_s"] for r in runs),
           "same_text_every_rep": len({r["ids_hash"] for r in runs}) == 1, "buckets": med_rows, "runs": runs}
    for part in ("early", "last_500"):
        for key in ("main_ms_per_token", "draft_ms_per_token", "draft_ms_per_call"):
            vals = [r[part][key] for r in runs if r[part][key] is not None]
            out[f"{part}_{key}"] = statistics.median(vals) if vals else None
    for key in ("main_growth_ms", "ratio_if_main_flat"):
        out[key] = statistics.median(main_growth(r)[key] for r in runs)
    if s.rt.drafter is not None:
        w = s.rt.drafter.window
        out.update(window=w.size, keep=w.keep, discard=w.discard,
                   acceptance=statistics.median(r["acceptance"] for r in runs),
                   acceptance_last_500=statistics.median(r["last_500"]["acceptance"] for r in runs),
                   shifts=runs[0]["shifts"], draft_cost_ratio=max(r["draft_cost_ratio"] for r in runs),
                   draft_tokens_processed=runs[0]["draft_tokens_processed"])
    return out


def plot(summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in summaries:
        x = [b["to"] for b in r["buckets"]]
        ax1.plot(x, [b["tok_s"] for b in r["buckets"]], marker="o", label=r["label"])
        if r["draft_ctx"] is not None:
            ax2.plot(x, [b["acceptance"] for b in r["buckets"]], marker="o", label=r["label"])
    ax1.set_ylabel("tokens/s per 100 tokens (median)")
    ax1.set_title(f"{title}, greedy, {summaries[0]['reps']} reps")
    ax2.set_ylabel("acceptance")
    ax2.set_xlabel("tokens generated")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--ctx-size", type=positive_int, default=4096, metavar="N",
                   help="main model context (default: 4096)")
    p.add_argument("--draft-ctx", type=positive_int, nargs="+", default=[256, 4096], metavar="N",
                   help="draft contexts to compare; below the main's, the draft slides a window (default: 256 4096)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the setting without a draft")
    p.add_argument("--max-tokens", type=positive_int, default=2000, metavar="N",
                   help=f"tokens per generation, at least {MIN_TOKENS} (default: 2000)")
    p.add_argument("--reps", type=positive_int, default=5, metavar="N",
                   help="repetitions of every setting (default: 5)")
    p.add_argument("--warmup", type=positive_int, default=400, metavar="N",
                   help="tokens of an untimed first generation per setting (default: 400)")
    p.add_argument("--draft-policy", default="adaptive", choices=["adaptive", "fixed"],
                   help="draft policy (default: adaptive)")
    p.add_argument("--cache-type", default=ModelOptions.cache_type_k,
                   help=f"main model KV cache type (default: {ModelOptions.cache_type_k})")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="exact decoding for the draft settings (default: on); the setting without a draft decodes "
                        "lone rows, as --draft none does")
    p.add_argument("--out", type=Path, default=Path("bench/out/window"),
                   help="writes OUT.json and OUT.png (default: bench/out/window)")


def main(args: argparse.Namespace) -> int:
    if args.max_tokens < MIN_TOKENS:
        raise BadInputError(f"--max-tokens must be at least {MIN_TOKENS}, got {args.max_tokens}",
                            f"the bench compares tokens 100-300 with the last {LATE}")
    opts = ModelOptions(model=str(one_main(args)), draft=str(draft_file(args)), ctx_size=args.ctx_size,
                        threads=args.threads, cache_type_k=args.cache_type, cache_type_v=args.cache_type,
                        exact=args.exact)
    settings = [load(opts, n) for n in args.draft_ctx] + ([] if args.no_baseline else [load(opts, None)])
    try:
        summaries = run_settings(settings, args)
    finally:
        for s in settings:
            s.rt.close()
    same = len({r["ids_hash"] for m in summaries for r in m["runs"]}) == 1
    print(f"every setting and repetition generated the same tokens: {'yes' if same else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"prompt": PROMPT, "tokens": args.max_tokens, "draft_policy": args.draft_policy,
         "same_tokens_everywhere": same, "settings": summaries}, indent=1))
    rt = settings[0].rt
    plot(summaries, args.out.with_suffix(".png"),
         f"{rt.main_model.name} (ctx {args.ctx_size}) + {Path(opts.draft).stem}")
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")
    return 0


def run_settings(settings: list[Setting], args: argparse.Namespace) -> list[dict]:
    """Warm each setting up, run the repetitions interleaved, print each run and the medians."""
    for s in settings:  # untimed: calibrate costs and learn acceptance once, as a server's first request does
        one_run(s, args.warmup, args.draft_policy)
    runs: dict[str, list[dict]] = {s.label: [] for s in settings}
    for rep in range(args.reps):
        for s in (settings if rep % 2 == 0 else settings[::-1]):
            r = one_run(s, args.max_tokens, args.draft_policy)
            runs[s.label].append(r)
            extra = (f"; acceptance {r['acceptance']:.3f}, last {LATE} {r['last_500']['acceptance']:.3f}; "
                     f"shifts {r['shifts']}; draft cost ratio {r['draft_cost_ratio']:.3f}") if "acceptance" in r else ""
            print(f"rep {rep} {s.label}: {r['generated']} tokens ({r['stop_reason']}), tok/s 100-300 "
                  f"{r['early']['tok_s']:.1f}, last {LATE} {r['last_500']['tok_s']:.1f} ({r['ratio']:.2f}x){extra}; "
                  f"{where_time_went(r)}", flush=True)
    summaries = [summarize(s, runs[s.label]) for s in settings]
    for m in summaries:
        print(f"{m['label']}: median last-{LATE}/100-300 {m['ratio_median']:.2f}x "
              f"(reps {', '.join(f'{x:.2f}' for x in m['ratios'])}); median tok/s {m['early_tok_s']:.1f} -> "
              f"{m['last_500_tok_s']:.1f}; same text every rep: {m['same_text_every_rep']}; median main ms/token "
              f"{m['early_main_ms_per_token']:.1f} -> {m['last_500_main_ms_per_token']:.1f}"
              + (f", draft ms/token {m['early_draft_ms_per_token']:.1f} -> {m['last_500_draft_ms_per_token']:.1f}"
                 if m["early_draft_ms_per_call"] is not None else ""))
        print(f"  main model's own growth {m['main_growth_ms']:.1f} ms/token; last-{LATE}/100-300 with it taken out "
              f"{m['ratio_if_main_flat']:.2f}x")
    return summaries
