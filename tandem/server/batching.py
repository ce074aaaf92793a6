"""The engine thread's continuous batching (`tandem serve --parallel N`): requests for a main model whose context
holds several sequences run through that model's Scheduler, one batched decode per step.

The Engine hands each job over with `start()`; `step()` advances every model's running sequences once and routes
what each produced to its job (tokens, then Done with the stats, or a TandemError). A job waits in the
model's backlog while all its sequences are busy, and a job whose draft was loaded on demand waits until the
model is idle, then runs alone (that draft has one context).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import CancelledError, EngineError, TandemError
from tandem.runtime import Runtime
from tandem.sched.scheduler import Scheduler
from tandem.server.drafts import CONFIGURED
from tandem.server.metrics import Metrics
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, Token

log = logging.getLogger("tandem.server")


@dataclass
class _Live:
    """A job whose sequence is running."""

    job: object
    """The engine's _Job (put(), cancelled, submitted, id)."""
    status: str | None
    """The draft status its Done carries (why the draft is not drafting), or None."""
    first: float | None = None
    """Seconds from submission to its first token."""


class Batcher:
    """Schedulers of the loaded models whose contexts hold several sequences, and the jobs they run."""

    def __init__(self, metrics: Metrics, *, prompt: Callable, cancel: Callable, run_alone: Callable,
                 done: Callable):
        """`prompt(rt, spec)`: a job's prompt tokens; `cancel(job)`: its cancel check; `run_alone(rt, choice, job)`:
        the one-at-a-time path; `done(job, stats)`: log a finished generation."""
        self._metrics = metrics
        self._prompt, self._cancel, self._run_alone, self._done = prompt, cancel, run_alone, done
        self._scheds: dict[int, tuple[Runtime, Scheduler]] = {}  # by id(runtime)
        self._live: dict[str, _Live] = {}
        self._backlog: dict[int, deque[tuple[object, object]]] = {}
        self.published = (0, 0.0)
        """(sequences running, KV usage) after the last step: what /health reads from other threads."""

    @staticmethod
    def wants(rt: Runtime) -> bool:
        """Whether this runtime's main context holds several sequences (started with --parallel N > 1)."""
        return rt.main.params.n_seq_max > 1

    @property
    def busy(self) -> bool:
        return any(s.running for _, s in self._scheds.values()) or any(self._backlog.values())

    @property
    def running(self) -> int:
        return sum(len(s.running) for _, s in self._scheds.values())

    def start(self, rt: Runtime, choice: ModelDrafter | str, job) -> None:
        """Run the job as a sequence of rt's scheduler now, or when a sequence (or, for an on-demand draft, the
        whole model) is free."""
        key = id(rt)
        if key not in self._scheds:
            self._scheds[key] = (rt, Scheduler(rt.main, on_evict=rt.evicted))
        self._backlog.setdefault(key, deque()).append((job, choice))
        self._admit(key)

    def _admit(self, key: int) -> None:
        rt, sched = self._scheds[key]
        backlog = self._backlog[key]
        while backlog and sched.capacity:
            job, choice = backlog[0]
            if isinstance(choice, ModelDrafter):  # an on-demand draft has one context: the model must be idle
                if sched.running:
                    return
                backlog.popleft()
                self._run_alone(rt, choice, job)
                continue
            if job.cancelled.is_set():
                backlog.popleft()
                job.put(CancelledError("the client went away before its turn", "nothing to do"))
                continue
            try:
                prompt = self._prompt(rt, job.spec)
                params = job.spec.params_for(rt)
                if job.spec.max_tokens_from_context:
                    params = dataclasses.replace(params, max_tokens=rt.main.capacity)
                live = _Live(job, None)

                def make(seq: int, prompt=prompt, params=params, live=live, job=job, choice=choice):
                    steps, live.status = rt.steps(prompt, params, seq, use_draft=choice == CONFIGURED,
                                                  cancel=self._cancel(job), load=lambda: len(sched.running),
                                                  room=sched.room_for(seq),
                                                  room_relocated=sched.room_relocated_for(seq))
                    return steps
                if sched.add(job.id, prompt, make) is None:
                    return  # running requests hold the cells its prompt needs (a shared pool): after a step
                backlog.popleft()
                self._live[job.id] = live
            except TandemError as e:
                backlog.popleft()
                job.put(e)
            except Exception as e:  # noqa: BLE001 - a failure to start one request fails it, not the engine thread
                log.exception("starting a batched request failed")
                backlog.popleft()
                job.put(EngineError(f"generation failed: {type(e).__name__}: {e}", "see the server log; retry"))

    def step(self) -> None:
        """One step of every model with running sequences; route what each sequence produced."""
        for key, (rt, sched) in list(self._scheds.items()):
            if sched.running:
                self._metrics.step_sequences.observe(len(sched.running))
                try:
                    out = sched.step()
                except Exception as e:  # noqa: BLE001 - an engine failure fails this model's requests, not the server
                    log.exception("a batched step failed")
                    err = EngineError(f"generation failed: {type(e).__name__}: {e}", "see the server log; retry")
                    out = {rid: [err] for rid in list(sched.running)}
                    for rid in list(sched.running):
                        sched.abort(rid)
                for rid, events in out.items():
                    self._route(rid, events)
                if any(isinstance(events[-1], Done) for events in out.values()):
                    self._metrics.record_policy(str(rt.main_model.path), rt.policy_report(), rt.suffix_report())
            self._admit(key)
        self.published = (self.running, self.kv_usage())
        self._metrics.requests_running.set(self.published[0])
        self._metrics.kv_usage.set(self.published[1])

    def _route(self, rid: str, events: list) -> None:
        live = self._live.get(rid)
        if live is None:
            return
        for ev in events:
            if isinstance(ev, Token) and live.first is None:
                live.first = time.perf_counter() - live.job.submitted
            if isinstance(ev, Done):
                if live.status:
                    ev.stats.draft_status = live.status
                self._metrics.record_generation(ev.stats, live.first)
                self._done(live.job, ev.stats)
            live.job.put(ev)
            if isinstance(ev, (Done, TandemError)):
                del self._live[rid]

    def serving(self, rt: Runtime) -> bool:
        """Whether requests run or wait on this runtime."""
        entry = self._scheds.get(id(rt))
        return bool(entry and entry[1].running) or bool(self._backlog.get(id(rt)))

    def kv_usage(self) -> float:
        """Share of the batched models' main KV cells in use."""
        used = total = 0
        for rt, _ in self._scheds.values():
            used += sum(len(rt.main.held(s)) for s in range(rt.main.params.n_seq_max))
            total += rt.main.n_ctx
        return used / total if total else 0.0

    def forget(self, rt: Runtime) -> list:
        """Drop an unloaded runtime's scheduler; its running and waiting jobs, to be told."""
        entry = self._scheds.pop(id(rt), None)
        jobs = [job for job, _ in self._backlog.pop(id(rt), deque())]
        if entry is not None:
            for rid in list(entry[1].running):
                entry[1].abort(rid)
                live = self._live.pop(rid, None)
                if live is not None:
                    jobs.append(live.job)
        return jobs

    def stop(self) -> list:
        """Every job still running or waiting (the engine tells them it is shutting down)."""
        jobs = []
        for rt, _ in list(self._scheds.values()):
            jobs += self.forget(rt)
        return jobs
