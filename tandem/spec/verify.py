"""Verification of a draft against the main model's logits: a pure function, randomness passed in.

Words as in vLLM: the accepted tokens are the draft's prefix the main model agrees with; then one token
is appended from the main model, the *recovered* token after a rejection or the *bonus* token when all
drafts were accepted. Every step therefore yields between 1 and k+1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.spec.sampling import SamplingParams, probs, sample


@dataclass(frozen=True)
class DraftProposal:
    """What a drafter offers for verification."""

    tokens: list[int]
    """Proposed token ids, in order."""
    probs: np.ndarray | None = None
    """[len(tokens), n_vocab]: the draft's filtered distributions the tokens were sampled from, or None
    (n-gram drafts, greedy drafts): then verification samples from p and compares."""


EMPTY = DraftProposal([])


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of one verification step."""

    accepted: int
    """How many draft tokens were accepted (a prefix of the proposal)."""
    next_token: int
    """The main model's token after the accepted prefix: recovered or bonus."""
    bonus: bool = False
    """True when every draft token was accepted and next_token is the bonus token."""

    def tokens(self, proposal: DraftProposal) -> list[int]:
        return [*proposal.tokens[: self.accepted], self.next_token]


def uniforms_needed(k: int) -> int:
    """Uniform numbers verify() consumes for a proposal of k tokens: k acceptance tests, k+1 samples."""
    return 2 * k + 1


def verify(proposal: DraftProposal, target_logits: np.ndarray, sp: SamplingParams,
           uniforms: np.ndarray) -> VerifyResult:
    """Check the proposal against target logits [k+1, n_vocab] (row i predicts the token after draft i-1).

    T = 0: accept while argmax equals the draft token.
    T > 0 with draft probabilities: accept x with probability min(1, p(x)/q(x)); on rejection sample the
    recovered token from normalised max(0, p - q) (Leviathan et al. 2023; Chen et al. 2023).
    T > 0 without them: sample y ~ p at each position and accept while y equals the draft token.
    """
    k = len(proposal.tokens)
    if sp.greedy:
        best = target_logits[: k + 1].argmax(axis=1)
        m = 0
        while m < k and best[m] == proposal.tokens[m]:
            m += 1
        return VerifyResult(m, int(best[m]), bonus=m == k)
    u_accept, u_sample = uniforms[:k], uniforms[k:]
    for i, x in enumerate(proposal.tokens):
        p = probs(target_logits[i], sp)
        if proposal.probs is None:
            y = sample(p, u_sample[i])
            if y != x:
                return VerifyResult(i, y)
            continue
        q = proposal.probs[i]
        if u_accept[i] * q[x] < p[x]:  # u < p/q without dividing by a tiny q
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return VerifyResult(i, sample(residual / total if total > 0 else p, u_sample[i]))
    return VerifyResult(k, sample(probs(target_logits[k], sp), u_sample[k]), bonus=True)

