"""Log probabilities of the emitted tokens: a pure function of one row, computed only when a generation asks.

Terms: a position's *row* is the main model's logits there after the logits processors (penalties, bias, a
grammar), the row its token is chosen or verified from: the first token's row, or verification row i for the
i-th token a step emits, whether the draft proposed that token or the main model chose it. The reported
*distribution* is the softmax of that row at temperature 1, before temperature, top-k, top-p and min-p (as
OpenAI reports the model's distribution, not the sampler's); a drafted token gets the main model's
log probability, never the draft's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_TOP = 20
"""Most alternatives per position (OpenAI's top_logprobs limit)."""
FLOOR = -9999.0
"""The log probability reported for a token of probability 0 (a masked one), as OpenAI does: JSON has no -inf."""


@dataclass(frozen=True)
class Logprob:
    """One token and its log probability at a position."""

    token: int
    """Token id."""
    bytes: bytes
    """The token's text as the model's bytes (a piece of a UTF-8 character possibly)."""
    logprob: float
    """Natural log of its probability in the distribution; FLOOR when that is 0."""


@dataclass(frozen=True)
class TokenLogprob:
    """The log probabilities of one emitted position."""

    chosen: Logprob
    """The emitted token."""
    top: tuple[Logprob, ...]
    """The most likely tokens, most likely first (ties: lower id first), as many as asked for, fewer only when
    fewer tokens have a probability above 0."""


def log_softmax(row: np.ndarray) -> np.ndarray:
    """log softmax of a row of logits at temperature 1, in float64."""
    x = row.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def top_tokens(logprobs: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n largest finite entries, largest first, ties by lower id (without sorting the whole row)."""
    n = min(n, int(np.isfinite(logprobs).sum()))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    cut = np.partition(logprobs, logprobs.size - n)[logprobs.size - n]  # the n-th largest value
    ids = np.flatnonzero(logprobs >= cut)
    return ids[np.lexsort((ids, -logprobs[ids]))][:n]


def token_logprob(row: np.ndarray, token: int, n_top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The record of `token` emitted from `row` with its n_top most likely alternatives; `piece` gives a token's
    bytes."""
    lp = log_softmax(row)

    def entry(t: int) -> Logprob:
        value = float(lp[t])
        return Logprob(t, piece(t), value if np.isfinite(value) else FLOOR)

    return TokenLogprob(entry(token), tuple(entry(int(t)) for t in top_tokens(lp, n_top)))
