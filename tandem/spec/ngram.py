"""Prompt-lookup drafting: no draft model, the continuation of the longest recent n-gram match.

When the text repeats itself (code being edited, quoted input, lists, a model stuck in a loop), the tokens
after the newest n tokens often already occurred after the same n tokens earlier in the prompt or the
output. The index maps each n-gram to the end of its most recent occurrence that has a following token,
and grows by the tokens appended since the previous call: a step costs a few dict operations, not a scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem.spec.processors import NONE, Processors
from tandem.spec.sampling import SamplingParams
from tandem.spec.verify import EMPTY, DraftProposal

NGRAM_MIN = 2
"""Shortest n-gram looked up. Measured on SmolLM2-135M greedy chat output (10 bench and dev prompts, 160
tokens each, replayed offline with 4-token drafts): 1..4 drafts 2.4x the tokens of 2..4 at 22% instead of
46% acceptance for 7% more accepted tokens, which the extra verification work costs more than it gains;
a longest match of one token predicted the next token 19% of the time, of two tokens 50%."""
NGRAM_MAX = 4
"""Longest n-gram looked up (tried first). 2..3, 2..4, 2..6 and 2..8 accepted the same tokens in that
replay; 4 keeps a little context for long repeats at 3 dict entries per token."""


class NgramDrafter:
    """Drafts the tokens that followed the most recent earlier occurrence of the longest matching suffix.

    Proposals carry no probabilities (verification samples and compares at T > 0). When the match's
    continuation runs into the end of the history, it continues with its own proposal, which extends a
    repeating pattern (period = distance to the match).
    """

    name = "ngram"

    def __init__(self, ngram_min: int = NGRAM_MIN, ngram_max: int = NGRAM_MAX):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self._tail: list[int] = []  # the last tokens indexed, to notice a history that is not an extension
        self._n = 0                 # history length at the last call: n-grams ending before it are indexed
        self.match = 0
        """Size of the n-gram the last proposal matched (0: none)."""

    def reset(self, history: Sequence[int] | None = None) -> None:
        """A full reset: indexing the new history again is a dict update per n-gram."""
        self._ends.clear()
        self._tail.clear()
        self._n = 0
        self.match = 0

    def prefill(self, history: Sequence[int]) -> None:
        """Index the prompt now (a dict update per n-gram; no model)."""
        self.update(history)

    def kv_cells(self, n_history: int) -> int:
        """No KV cache: a lookup costs the same at any length."""
        return 0

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams | None = None,
                rng: np.random.Generator | None = None, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        """Up to max_tokens tokens continuing `history`; EMPTY when no n-gram of it matches."""
        self.update(history)
        self.match = 0
        found = self.lookup(history) if max_tokens > 0 else None
        if found is None:
            return EMPTY
        self.match, end = found
        n = len(history)
        tokens: list[int] = []
        for j in range(end, end + max_tokens):
            tokens.append(history[j] if j < n else tokens[j - n])
        return DraftProposal(tokens)

    def lookup(self, history: Sequence[int]) -> tuple[int, int] | None:
        """(size, end) of the longest suffix of history seen before: end is where its continuation starts."""
        n = len(history)
        for size in range(min(self.ngram_max, n), self.ngram_min - 1, -1):
            end = self._ends.get(tuple(history[n - size:]))
            if end is not None:
                return size, end
        return None

    def update(self, history: Sequence[int]) -> None:
        """Index the n-grams completed since the last call.

        A history shorter than the last one, or whose last indexed tokens changed, is indexed from scratch.
        (Earlier tokens are not compared, which would cost a scan per step: generate() calls reset() for
        each new sequence, and a stale index can only cost acceptance, never correctness.)"""
        n = len(history)
        if n < self._n or list(history[self._n - len(self._tail): self._n]) != self._tail:
            self.reset()
        # An n-gram is indexed once a token follows it: ends from the previous length to n - 1.
        for end in range(max(self._n, 1), n):
            for size in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._ends[tuple(history[end - size:end])] = end
        self._n = n
        self._tail = list(history[max(0, n - self.ngram_max):])
