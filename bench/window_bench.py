"""Sliding draft window: tokens/s and acceptance per 100 generated tokens, draft context 256 vs 4096.

The default pair (SmolLM2-135M F32 main, Q4_1 draft), main context 4096, one long greedy generation per
draft context. Writes docs/window.json (all numbers) and docs/window.png (tokens/s per 100-token window).

    .venv/bin/python bench/window_bench.py [--tokens 2000] [--draft-ctx 256 4096]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.config import ModelOptions, SpecOptions
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.sampling import SamplingParams
from tandem.spec.verify import DraftProposal

DOCS = Path(__file__).resolve().parent.parent / "docs"
BUCKET = 100
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

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None) -> DraftProposal:
        proposal = self.inner.propose(history, max_tokens, sp, rng, p_min)
        self.steps.append([len(history) - self.n_prompt, len(proposal.tokens), 0])
        return proposal

    def note(self, token: Token) -> None:
        """Credit an accepted draft token to the step that drafted it."""
        if token.source == "draft":
            self.steps[-1][2] += 1


def buckets(times: list[float], loads: list[float], steps: list[list[int]], t0: float) -> list[dict]:
    """Tokens/s and acceptance (of the steps starting in it) for each full 100-token window of the output."""
    out = []
    for b in range(len(times) // BUCKET):
        lo, hi = b * BUCKET, (b + 1) * BUCKET
        start = t0 if lo == 0 else times[lo - 1]
        drafted = sum(n for at, n, _ in steps if lo <= at < hi)
        accepted = sum(a for at, _, a in steps if lo <= at < hi)
        out.append({"from": lo, "to": hi, "tok_s": BUCKET / (times[hi - 1] - start),
                    "drafted": drafted, "accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None, "loadavg": loads[hi - 1]})
    return out


def span(rows: list[dict], lo: int, hi: int) -> dict:
    """Tokens/s and acceptance over the windows in [lo, hi)."""
    sel = [r for r in rows if lo <= r["from"] and r["to"] <= hi]
    secs = sum(BUCKET / r["tok_s"] for r in sel)
    drafted = sum(r["drafted"] for r in sel)
    return {"tok_s": len(sel) * BUCKET / secs, "acceptance": sum(r["accepted"] for r in sel) / max(drafted, 1)}


def distinct_4grams(ids: list[int]) -> float:
    """Share of distinct 4-grams: near 0 means the text loops."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / max(len(grams), 1)


def one_run(draft_ctx: int, n_tokens: int) -> dict:
    """Generate n_tokens greedily with the given draft context; return per-window and summary numbers."""
    rt = Runtime(ModelOptions(ctx_size=4096, ctx_size_draft=draft_ctx), announce=print)
    assert rt.drafter is not None
    prompt = rt.prompt(text=PROMPT, raw=True)
    spec = SpecOptions()
    # Fixed draft lengths: the adaptive policy reacts to timings, which on a shared machine would blur
    # the window's own effect.
    gp = GenParams(max_tokens=n_tokens, draft_max=spec.draft_max, draft_min=spec.draft_min,
                   draft_p_min=spec.draft_p_min, draft_policy="fixed")
    rec = Recorder(rt.drafter, len(prompt))
    draft_ctx_obj = rt.drafter.ctx
    processed0, load0 = draft_ctx_obj.tokens_processed, os.getloadavg()[0]
    times: list[float] = []
    loads: list[float] = []
    ids: list[int] = []
    t0 = time.perf_counter()
    for ev in generate(rt.main, prompt, gp, rec):
        if isinstance(ev, Token):
            times.append(time.perf_counter())
            loads.append(os.getloadavg()[0])
            ids.append(ev.id)
            rec.note(ev)
        elif isinstance(ev, Done):
            stats = ev.stats
    rows = buckets(times, loads, rec.steps, t0)
    s = stats
    result = {
        "draft_ctx": draft_ctx, "window": rt.drafter.window.size, "keep": rt.drafter.window.keep,
        "discard": rt.drafter.window.discard, "draft_policy": gp.draft_policy, "draft_max": gp.draft_max,
        "draft_p_min": gp.draft_p_min, "prompt_tokens": s.prompt_tokens,
        "generated": s.generated_tokens, "stop_reason": s.stop_reason, "seconds": times[-1] - t0,
        "acceptance": s.acceptance_rate, "drafted": s.drafted, "accepted": s.accepted, "rejected": s.rejected,
        "shifts": rt.drafter.shifts, "draft_tokens_processed": draft_ctx_obj.tokens_processed - processed0,
        "draft_cost_ratio": (draft_ctx_obj.tokens_processed - processed0)
        / (s.prompt_tokens + s.generated_tokens + s.rejected),
        "distinct_4grams_last_500": distinct_4grams(ids[-500:]), "loadavg_start_end": [load0, os.getloadavg()[0]],
        "early": span(rows, 100, 300), "last_500": span(rows, n_tokens - 500, n_tokens), "buckets": rows,
        "text_tail": rt.main_model.detokenize(ids[-60:]),
    }
    del rt
    gc.collect()
    return result


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in runs:
        x = [b["to"] for b in r["buckets"]]
        label = f"draft ctx {r['draft_ctx']}"
        ax1.plot(x, [b["tok_s"] for b in r["buckets"]], marker="o", label=label)
        ax2.plot(x, [b["acceptance"] for b in r["buckets"]], marker="o", label=label)
    ax1.set_ylabel("tokens/s (per 100 tokens)")
    ax1.set_title("SmolLM2-135M F32 main (ctx 4096) + Q4_1 draft, greedy")
    ax2.set_ylabel("acceptance")
    ax2.set_xlabel("tokens generated")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--draft-ctx", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--out", type=Path, default=DOCS / "window")
    args = ap.parse_args()
    runs = []
    for n in args.draft_ctx:
        r = one_run(n, args.tokens)
        print(f"draft ctx {n}: {r['generated']} tokens ({r['stop_reason']}), tok/s 100-300 {r['early']['tok_s']:.1f}, "
              f"last 500 {r['last_500']['tok_s']:.1f} ({r['last_500']['tok_s'] / r['early']['tok_s']:.2f}x); "
              f"acceptance all {r['acceptance']:.3f}, last 500 {r['last_500']['acceptance']:.3f}; shifts {r['shifts']}; "
              f"draft cost ratio {r['draft_cost_ratio']:.3f}", flush=True)
        runs.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"prompt": PROMPT, "runs": runs}, indent=1))
    plot(runs, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
