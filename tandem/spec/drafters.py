"""Drafters propose tokens for the main model to verify. All share one small interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tandem.engine.llama import Context
from tandem.spec.sampling import SamplingParams, probs, sample, top_prob
from tandem.spec.verify import EMPTY, DraftProposal


class Drafter(Protocol):
    """Anything that can guess the next tokens of a sequence."""

    name: str

    def reset(self) -> None:
        """Forget the previous sequence (a new generation starts)."""

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None) -> DraftProposal:
        """Up to max_tokens tokens that may follow `history` (prompt + output so far).

        A drafter with a confidence measure stops early when it falls below p_min."""


class ModelDrafter:
    """Drafts with a small model that shares the main model's vocabulary.

    Its KV cache mirrors a prefix of the history. Each step it rewinds to the longest prefix the
    history still agrees with, feeds the newly accepted tokens in one batch, then drafts one token per
    decode. The prompt is evaluated once; each accepted token is decoded once.
    """

    def __init__(self, ctx: Context, *, p_min: float = 0.0, name: str | None = None):
        self.ctx = ctx
        self.p_min = p_min
        self.name = name or ctx.model.name
        self._kv: list[int] = []  # tokens held in the draft KV cache, by position
        self._committed = 0       # prefix of _kv known to equal the history

    def reset(self) -> None:
        self._kv.clear()
        self._committed = 0
        self.ctx.rollback(0)

    def _sync(self, history: Sequence[int]) -> int:
        """Rewind the draft KV to the longest prefix shared with history; return its length."""
        n = self._committed
        limit = min(len(self._kv), len(history))
        while n < limit and self._kv[n] == history[n]:
            n += 1
        if n < len(self._kv):
            self.ctx.rollback(n)
            del self._kv[n:]
        return n

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None) -> DraftProposal:
        p_min = self.p_min if p_min is None else p_min
        max_tokens = min(max_tokens, self.ctx.n_ctx - len(history))
        if max_tokens <= 0:
            return EMPTY
        n = self._sync(history)
        pending = list(history[n:])
        logits = self.ctx.decode(pending, n, logits="last")[0]
        self._kv.extend(pending)
        self._committed = len(history)
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        for i in range(max_tokens):
            if p_min > 0 and top_prob(logits) < p_min:
                break
            if sp.greedy:
                tok = int(logits.argmax())
            else:
                q = probs(logits, sp)
                tok = sample(q, rng.random())
                rows.append(q)
            tokens.append(tok)
            if i + 1 < max_tokens:
                logits = self.ctx.decode([tok], len(self._kv), logits="last")[0]
                self._kv.append(tok)
        return DraftProposal(tokens, np.stack(rows) if rows else None)
