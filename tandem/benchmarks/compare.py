"""Side-by-side benchmark: every configuration on every prompt, interleaved, repeated, in one process.

Speed is reported as ratios to the no-draft configuration measured in the same run, because the
machines are shared and noisy. Next to each measured speedup it prints the model-bound estimate: the
speedup if Python cost nothing, from the time spent inside llama_decode alone.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.spec.generate import Done, GenParams, Token


@dataclass(frozen=True)
class BenchConfig:
    """One way of generating: a name and the keyword arguments Runtime.generate takes for it."""

    name: str
    """Label in tables and plots."""
    generate_kwargs: dict = field(default_factory=dict)
    """Passed to Runtime.generate (e.g. use_draft=False)."""
    params: dict = field(default_factory=dict)
    """GenParams fields this configuration overrides (e.g. spare_guess=False)."""
    peer: object | None = None
    """A tandem.benchmarks.peer.LlamaServerPeer that generates instead of Tandem (greedy only)."""


@dataclass
class Sample:
    """One generation's measurements."""

    config: str
    prompt_id: str
    rep: int
    tokens: int
    seconds: float
    """Wall time of the decode phase (after the first token)."""
    tokens_per_second: float
    time_to_first_token: float
    drafted: int
    accepted: int
    acceptance: float
    mean_accepted_length: float
    draft_steps: int
    plain_steps: int
    llama_seconds: float
    """Time spent inside llama_decode (main + draft) during the decode phase."""
    token_ids: list[int] = field(repr=False, default_factory=list)


def measure_peer(prompt: Sequence[int], gp: GenParams, cfg: BenchConfig, prompt_id: str, rep: int) -> Sample:
    """One greedy generation by a llama-server peer, from its own timings (no model bound: llama_seconds 0)."""
    r = cfg.peer.complete(prompt, gp.max_tokens)
    acc = r.accepted / r.drafted if r.drafted else 0.0
    steps = r.tokens - r.accepted  # every verification step yields one token of the main model's own
    return Sample(cfg.name, prompt_id, rep, r.tokens, r.seconds, r.tokens_per_second, r.time_to_first_token,
                  r.drafted, r.accepted, acc, r.accepted / steps if r.drafted and steps else 0.0, 0, 0, 0.0,
                  r.token_ids)


def measure(rt, prompt: Sequence[int], gp: GenParams, cfg: BenchConfig, prompt_id: str, rep: int) -> Sample:
    """Run one generation and collect its numbers."""
    if cfg.peer is not None:
        return measure_peer(prompt, gp, cfg, prompt_id, rep)
    ctxs = [rt.main] + ([rt.drafter.ctx] if getattr(rt, "drafter", None) is not None and hasattr(rt.drafter, "ctx")
                        else [])
    ids: list[int] = []
    llama0 = None
    stats = None
    for ev in rt.generate(prompt, dataclasses.replace(gp, cache_prompt=False, **cfg.params), **cfg.generate_kwargs):
        if isinstance(ev, Token):
            ids.append(ev.id)
            if llama0 is None:  # the first token ends the prompt phase
                llama0 = sum(c.decode_seconds for c in ctxs)
        elif isinstance(ev, Done):
            stats = ev.stats
    assert stats is not None and stats.identity_holds()
    llama = sum(c.decode_seconds for c in ctxs) - (llama0 or 0.0)
    return Sample(cfg.name, prompt_id, rep, stats.generated_tokens, stats.generation_time,
                  stats.tokens_per_second, stats.time_to_first_token, stats.drafted, stats.accepted,
                  stats.acceptance_rate, stats.mean_accepted_length, stats.draft_steps, stats.plain_steps,
                  llama, ids)


def run_suite(rt, prompts: dict[str, Sequence[int]], configs: Sequence[BenchConfig], gp: GenParams, reps: int,
              log: Callable[[str], None] = print) -> list[Sample]:
    """Interleave configurations within each (rep, prompt) so drift in machine load hits all alike."""
    samples = []
    for rep in range(reps):
        for pid, prompt in prompts.items():
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for cfg in order:
                s = measure(rt, prompt, gp, cfg, pid, rep)
                samples.append(s)
                log(f"rep {rep} {pid:>12} {cfg.name:>12}: {s.tokens_per_second:6.1f} tok/s, "
                    f"acceptance {s.acceptance:.2f}, {s.tokens} tokens")
    return samples


@dataclass
class Row:
    """Median numbers for one configuration on one prompt (or 'all')."""

    config: str
    prompt_id: str
    tokens_per_second: float
    ratio: float
    """Median over reps of tok/s divided by no-draft's tok/s in the same rep (a llama-server peer: divided by
    llama-server's without a draft)."""
    bound_ratio: float
    """The same ratio from llama_decode time only: what a zero-overhead loop would reach."""
    acceptance: float
    mean_accepted_length: float
    time_to_first_token: float
    same_output: bool
    """Greedy output identical to no-draft's in every rep."""
    end_to_end_ratio: float = 0.0
    """Median over reps of the baseline's whole request time (time to first token + decode) divided by this
    config's: the speedup with the prompt phase included (a draft's prompt processing counts there)."""


def summarize(samples: Sequence[Sample], baseline: str = "no-draft") -> list[Row]:
    by = {(s.config, s.prompt_id, s.rep): s for s in samples}
    configs = list(dict.fromkeys(s.config for s in samples))
    prompts = list(dict.fromkeys(s.prompt_id for s in samples))
    reps = sorted({s.rep for s in samples})
    rows = []
    for cfg in configs:
        for pid in [*prompts, "all"]:
            pids = prompts if pid == "all" else [pid]
            mine = [by[(cfg, p, r)] for p in pids for r in reps]
            base = [by[(_baseline(cfg, configs, baseline), p, r)] for p in pids for r in reps]
            ratios = [m.tokens_per_second / b.tokens_per_second for m, b in zip(mine, base) if b.tokens_per_second]
            whole = [(b.time_to_first_token + b.seconds) / (m.time_to_first_token + m.seconds)
                     for m, b in zip(mine, base) if m.time_to_first_token + m.seconds > 0 and m.tokens == b.tokens]
            bounds = [(m.tokens / m.llama_seconds) / (b.tokens / b.llama_seconds)
                      for m, b in zip(mine, base) if m.llama_seconds and b.llama_seconds]
            rows.append(Row(cfg, pid, statistics.median(m.tokens_per_second for m in mine),
                            statistics.median(ratios) if ratios else 0.0,
                            statistics.median(bounds) if bounds else 0.0,
                            statistics.mean(m.acceptance for m in mine),
                            statistics.mean(m.mean_accepted_length for m in mine),
                            statistics.median(m.time_to_first_token for m in mine),
                            all(m.token_ids == b.token_ids for m, b in zip(mine, base)),
                            statistics.median(whole) if whole else 0.0))
    return rows


def _baseline(cfg: str, configs: Sequence[str], baseline: str) -> str:
    """A llama-server peer is compared with llama-server without a draft when that ran, Tandem with Tandem."""
    return PEER if cfg.startswith(PEER) and PEER in configs else baseline


PEER = "llama-server"
"""Name of the llama-server peer without a draft; its speculative peers are named llama-server-*."""


def versus(samples: Sequence[Sample], a: str, b: str, *, end_to_end: bool = False) -> float | None:
    """Median over (prompt, rep) of tok/s of config a divided by config b's in the same rep (None if absent);
    `end_to_end`: b's whole request time (time to first token + decode) divided by a's instead."""
    by = {(s.config, s.prompt_id, s.rep): s for s in samples}
    pairs = [(s, by[(b, s.prompt_id, s.rep)]) for s in samples if s.config == a and (b, s.prompt_id, s.rep) in by]
    if end_to_end:
        ratios = [(o.time_to_first_token + o.seconds) / (m.time_to_first_token + m.seconds) for m, o in pairs
                  if m.time_to_first_token + m.seconds > 0]
    else:
        ratios = [m.tokens_per_second / o.tokens_per_second for m, o in pairs if o.tokens_per_second]
    return statistics.median(ratios) if ratios else None


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| config | prompt | tok/s | ratio vs no-draft | model bound | end-to-end ratio | acceptance "
             "| mean accepted len | TTFT s | same output |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.prompt_id} | {r.tokens_per_second:.1f} | {r.ratio:.2f}x | "
                     f"{r.bound_ratio:.2f}x | {r.end_to_end_ratio:.2f}x | {r.acceptance:.2f} | "
                     f"{r.mean_accepted_length:.2f} | {r.time_to_first_token:.3f} | {'yes' if r.same_output else 'NO'} |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[Row], samples: Sequence[Sample], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Markdown table, JSON (rows + raw samples + meta) and a PNG plot of tok/s per config and prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "bench.md", "json": out_dir / "bench.json", "png": out_dir / "bench.png"}
    paths["md"].write_text(markdown(rows) + "\n")
    raw = [{k: v for k, v in asdict(s).items() if k != "token_ids"} for s in samples]
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "samples": raw}, indent=1))
    configs = list(dict.fromkeys(r.config for r in rows))
    prompts = [p for p in dict.fromkeys(r.prompt_id for r in rows) if p != "all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(prompts)), 4))
    width = 0.8 / len(configs)
    for i, cfg in enumerate(configs):
        vals = [next(r.tokens_per_second for r in rows if r.config == cfg and r.prompt_id == p) for p in prompts]
        ax.bar([j + i * width for j in range(len(prompts))], vals, width, label=cfg)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(prompts))], prompts, rotation=15)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(meta.get("title", "Tandem bench"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
