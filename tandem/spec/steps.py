"""The decodes a generation asks for, one at a time, and how to run them at once.

A generation (tandem.spec.generate.sequence) and a draft model's drafting (ModelDrafter.propose_steps) are
generators: each yields a `Decode` whenever it needs llama_decode and gets the logits back through send(). Who
drives them decides how the decodes run: `run()` runs each at once, alone (one generation, the CLI, the
benchmarks); the scheduler (tandem.sched) runs the decodes of several sequences as one batch per context.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tandem.engine.llama import Context, SeqRows

T = TypeVar("T")


@dataclass(frozen=True)
class Decode:
    """One sequence's rows for a decode: answer with send(logits), the logits the rows ask for, or throw() the
    decode's error into the generator (it rolls back what it asked for and re-raises)."""

    rows: SeqRows
    ctx: Context | None = None
    """The context to decode in: None for the main model's, a draft model's context for a draft decode."""
    alone: bool = False
    """Decode the rows in a batch of their own: their logits must not depend on other sequences' rows (a row's
    logits can change with the number of rows beside it, as llama.cpp picks other kernels for other sizes)."""


Steps = Generator[Decode, np.ndarray, T]
"""Work that yields its decodes and returns a T."""


def decode(ctx: Context, rows: SeqRows) -> np.ndarray:
    """The rows decoded in `ctx` now, alone (a long run of tokens in several n_batch chunks)."""
    return ctx.decode(rows.tokens, rows.pos0, seq_id=rows.seq_id, logits=rows.logits)


def run(steps: Steps[T], main: Context | None = None) -> T:
    """Drive `steps` to the end, each decode run at once in its context (`main` for the main model's), and return
    what they return. A failed decode is thrown into them first, so they roll back before it propagates."""
    logits: np.ndarray | None = None
    while True:
        try:
            d = steps.send(logits)
        except StopIteration as stop:
            return stop.value
        try:
            logits = decode(d.ctx or main, d.rows)
        except BaseException as e:
            steps.throw(e)
            raise
