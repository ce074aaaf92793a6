"""Sampling maths on numpy arrays: the same transform is applied to the main (p) and draft (q) logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.errors import BadInputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Defaults are greedy decoding."""

    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Random seed; the same seed and request give the same output."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise BadInputError(f"temperature must be between 0 and 100, got {self.temperature}",
                                "use 0 for greedy output or a value such as 0.7", param="temperature")
        if self.top_k < 0:
            raise BadInputError(f"top_k must be >= 0, got {self.top_k}", "use 0 to disable top-k", param="top_k")
        if not (0.0 < self.top_p <= 1.0):
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p}", "use 1 to disable top-p",
                                param="top_p")
        if not (0.0 <= self.min_p <= 1.0):
            raise BadInputError(f"min_p must be in [0, 1], got {self.min_p}", "use 0 to disable min-p",
                                param="min_p")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probs(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """The filtered, normalised distribution for one row of logits (float64).

    Order: temperature, then top-k, top-p and min-p on the tempered distribution.
    """
    x = logits.astype(np.float64) / max(sp.temperature, 1e-6)
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    if sp.top_k and sp.top_k < p.size:
        cut = np.partition(p, -sp.top_k)[-sp.top_k]
        p = np.where(p >= cut, p, 0.0)
    if sp.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(csum, sp.top_p * csum[-1])) + 1
        mask = np.zeros_like(p, dtype=bool)
        mask[order[:n_keep]] = True
        p = np.where(mask, p, 0.0)
    if sp.min_p > 0.0:
        p = np.where(p >= sp.min_p * p.max(), p, 0.0)
    return p / p.sum()


def sample(p: np.ndarray, u: float) -> int:
    """Inverse-CDF sample from distribution p with one uniform number u in [0, 1)."""
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, p.size - 1)


def top_prob(logits: np.ndarray) -> float:
    """The model's own confidence: the largest softmax probability at temperature 1."""
    m = logits.max()
    return float(1.0 / np.exp(logits - m, dtype=np.float64).sum())
