"""Logits processors: changes to the main model's distribution that depend on the tokens before a position
(penalties, biases, grammar masks).

Terms: a *processor* maps (history, logits row) to the row the token at that position is chosen from; the
*history* is everything before the position (prompt, output so far, and the draft tokens before it in a
verification batch). A processor may keep state (a grammar matcher) as long as it follows the history it is
given, forward or back (rollback), and is used by one generation only. A processor that depends on where the
output starts, or on the model's vocabulary, is *bound* to the generation when it starts (for_prompt()).

Lossless speculation needs only that every row the main model verifies is processed with its own history:
verify() then compares the draft against the processed distribution p, whatever the draft proposed. The draft
model samples from its processed rows too, so that its q is the distribution it really drew from, and fewer of
its tokens are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class LogitsProcessor(Protocol):
    """One change to a row of logits (n_vocab float32)."""

    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """The processed row for the position after `history`; may change `logits` in place and return it."""


@runtime_checkable
class PromptBound(Protocol):
    """A processor that is bound to a generation when it starts (the penalties: the output starts after the
    prompt; a logit bias: its ids are checked against the vocabulary)."""

    def for_prompt(self, prompt: Sequence[int], n_vocab: int) -> LogitsProcessor:
        """The processor for a generation from `prompt` with a main model of n_vocab tokens."""


@runtime_checkable
class GuidingProcessor(LogitsProcessor, Protocol):
    """A processor that can also say which tokens come next for sure, and which proposed tokens it allows (a
    grammar): generation drafts the forced tokens and cuts drafts at the first refused token."""

    def forced(self, history: Sequence[int]) -> list[int]:
        """Tokens every allowed continuation of `history` starts with (may be empty)."""

    def admissible(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens`, proposed after `history`, are allowed, in order."""


@dataclass(frozen=True)
class Processors:
    """The processors of one generation, applied in order."""

    chain: tuple[LogitsProcessor, ...] = ()
    """Applied first to last; empty: rows are used as the model gives them."""

    def __bool__(self) -> bool:
        return bool(self.chain)

    def start(self, prompt: Sequence[int], n_vocab: int) -> Processors:
        """The chain of one generation from `prompt`: PromptBound processors bound to it, others as they are."""
        return Processors(tuple(p.for_prompt(prompt, n_vocab) if isinstance(p, PromptBound) else p
                                for p in self.chain))

    def then(self, proc: LogitsProcessor) -> Processors:
        """This chain with `proc` applied last."""
        return Processors((*self.chain, proc))

    @property
    def guided(self) -> bool:
        """Whether a processor of the chain guides (a grammar)."""
        return any(isinstance(proc, GuidingProcessor) for proc in self.chain)

    def forced(self, history: Sequence[int]) -> list[int]:
        """The tokens the first guiding processor forces after `history` ([] when none guides)."""
        for proc in self.chain:
            if isinstance(proc, GuidingProcessor):
                return proc.forced(history)
        return []

    def admissible(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens` every guiding processor allows after `history` (all when none guides)."""
        n = len(tokens)
        for proc in self.chain:
            if isinstance(proc, GuidingProcessor) and n:
                n = min(n, proc.admissible(history, tokens[:n]))
        return n

    def row(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """One processed row: the distribution after `history`."""
        for proc in self.chain:
            logits = proc(history, logits)
        return logits

    def rows(self, history: Sequence[int], drafts: Sequence[int], logits: np.ndarray) -> np.ndarray:
        """Process verification rows [k+1, n_vocab] in place: row i follows history + drafts[:i].

        Stops after the first row that refuses its draft token (logit -inf): verification rejects that token
        there, so later rows are never read, and a stateful processor never has to follow a refused token.
        """
        hist = list(history)
        for i in range(len(drafts) + 1):
            logits[i] = self.row(hist, logits[i])
            if i == len(drafts) or logits[i][drafts[i]] == -np.inf:
                break
            hist.append(drafts[i])
        return logits


NONE = Processors()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (a KV cache's and a new prompt's, a matcher's and a history)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
