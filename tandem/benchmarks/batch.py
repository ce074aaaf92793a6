"""Several requests at once through the engine's scheduler (tandem.sched): aggregate tokens per second.

For each concurrency N: N greedy requests (the bench prompts, cycled), --max-tokens each, all started together
on a main context of N sequences with paged cells, through Scheduler.step() (one batched main decode per step),
without a draft and with the draft (one draft context of N sequences with paged cells, as `tandem serve
--parallel N` makes: one batched draft decode per draft position for every drafting sequence). Baseline: the same
N requests one after another with generate() on a one-sequence context (with the runtime's one draft context).
Engine level: no HTTP; what continuous batching can give on this machine.

--fixed K [K ...] prints a second table: the batched requests with the draft at the fixed policy, drafting up to K
tokens every step, next to the adaptive policy and no draft. It shows what drafting costs where the policy drafts
little or nothing (several sequences' rows on a CPU are no longer almost free to verify).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from tandem.benchmarks.common import (add_concurrency_arguments, add_model_arguments, draft_file, load_prompts,
                                      one_main, positive_int)
from tandem.config import ModelOptions
from tandem.engine.llama import Context
from tandem.models.fit import plan_for
from tandem.prompts import DATA
from tandem.runtime import Runtime
from tandem.sched.scheduler import Scheduler
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, sequence

HELP = "several requests at once through the scheduler: aggregate tok/s by concurrency"
"""One line for `tandem bench --help`."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    add_concurrency_arguments(p, positions=1024)
    p.add_argument("--fixed", type=positive_int, nargs="+", default=[], metavar="K",
                   help="instead: batched requests with the draft at the fixed policy (--draft-policy fixed "
                        "--draft-max K) for each K, next to the adaptive policy and no draft")


def _batched(rt: Runtime, main: Context, prompts: list[list[int]], gp: GenParams, drafters: list | None) -> float:
    """Aggregate tokens/s of the prompts run together through a Scheduler (`drafters`: by sequence id)."""
    sched = Scheduler(main)
    for s in range(main.params.n_seq_max):
        main.rollback(0, seq_id=s)
    t0, tokens = time.perf_counter(), 0
    for i, prompt in enumerate(prompts):
        sched.add(str(i), prompt, lambda s, p=prompt: sequence(main, p, gp, drafters[s] if drafters else None,
                                                               seq_id=s, costs=rt.cost,
                                                               load=lambda: len(sched.running)))
    while sched.running:
        for events in sched.step().values():
            tokens += sum(e.stats.generated_tokens for e in events if isinstance(e, Done))
    return tokens / (time.perf_counter() - t0)


def _sequential(rt: Runtime, prompts: list[list[int]], gp: GenParams, use_draft: bool) -> float:
    t0, tokens = time.perf_counter(), 0
    for prompt in prompts:
        for ev in rt.generate(prompt, gp, model=rt.drafter if use_draft else None, use_draft=use_draft):
            if isinstance(ev, Done):
                tokens += ev.stats.generated_tokens
    return tokens / (time.perf_counter() - t0)


def _fixed_row(rt: Runtime, main: Context, prompts: list[list[int]], gp: GenParams, drafters: list, n: int,
               ks: list[int]) -> None:
    """One row of the --fixed table: no draft, the adaptive policy, then the fixed policy at each k."""
    cells = [_batched(rt, main, prompts, gp, None), _batched(rt, main, prompts, gp, drafters)]
    cells += [_batched(rt, main, prompts, dataclasses.replace(gp, draft_policy="fixed", draft_max=k), drafters)
              for k in ks]
    print(f"| {n} | {cells[0]:.1f} | " + " | ".join(f"{c:.1f} ({c / cells[0]:.2f}x)" for c in cells[1:]) + " |",
          flush=True)


def main(args: argparse.Namespace) -> int:
    main_path, draft = one_main(args), draft_file(args)
    opts = ModelOptions(model=str(main_path), draft=str(draft), ctx_size=args.ctx_size, threads=args.threads)
    rt = Runtime(opts, announce=lambda _s: None)
    texts = list(load_prompts(DATA / "bench_prompts.jsonl", None).values())
    gp = GenParams(max_tokens=args.max_tokens, cache_prompt=False)
    params = plan_for(opts, main_path, draft).draft.params
    print(f"main {main_path.name}, draft {draft.name}; {args.max_tokens} tokens a request; aggregate tok/s\n")
    if args.fixed:
        print("| N | batched, no draft | draft, adaptive | " + " | ".join(f"draft, fixed k = {k}" for k in args.fixed)
              + " |")
        print("|---:|---:|---:|" + "---:|" * len(args.fixed), flush=True)
    else:
        print("| N | one after another, no draft | batched, no draft | ratio | one after another, draft | batched, "
              "draft | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    try:
        for n in args.concurrency:
            prompts = [rt.prompt(text=texts[i % len(texts)]) for i in range(n)]
            main = Context(rt.main_model, dataclasses.replace(rt.plan.main.params, n_ctx=args.ctx_size * n, n_seq_max=n,
                                                              seq_cells=True))
            shared = (Context(rt.drafter.ctx.model, dataclasses.replace(params, n_ctx=args.ctx_size * n, n_seq_max=n,
                                                                        seq_cells=True)) if rt.drafter else None)
            drafters = [ModelDrafter(shared, seq_id=s, main_n_ctx=main.capacity) for s in range(n)] if shared else []
            try:
                if args.fixed:
                    _fixed_row(rt, main, prompts, gp, drafters, n, args.fixed)
                    continue
                seq_plain = _sequential(rt, prompts, gp, False)
                bat_plain = _batched(rt, main, prompts, gp, None)
                seq_draft = _sequential(rt, prompts, gp, True) if drafters else 0.0
                bat_draft = _batched(rt, main, prompts, gp, drafters) if drafters else 0.0
            finally:
                if shared is not None:
                    shared.close()
                main.close()
            draft_ratio = f"{bat_draft / seq_draft:.2f}x" if seq_draft else "n/a"
            print(f"| {n} | {seq_plain:.1f} | {bat_plain:.1f} | {bat_plain / seq_plain:.2f}x | {seq_draft:.1f} | "
                  f"{bat_draft:.1f} | {draft_ratio} |", flush=True)
    finally:
        rt.close()
    return 0
