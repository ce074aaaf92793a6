"""How many tokens to draft each step: the number k (0 included) with the most expected tokens per second.

Per step, with a per-position acceptance profile a_1..a_k (a_i: chance that draft token i is accepted
given that tokens 1..i-1 were), a step that drafts k tokens yields on average

    tokens(k) = 1 + sum_{j<=k} prod_{i<=j} a_i        and costs    time(k) = draft_cost(k) + verify_cost(k+1)

and the policy picks the k in {0} U [draft_min, max_k] maximising tokens(k) / time(k). k = 0 is a plain
step (one single-token decode). Costs are measured online (`CostModel`, shared across requests);
acceptance is estimated per sequence (`AdaptivePolicy`, new per request). When no k > 0 pays, the policy
still drafts a small probe now and then, spaced so that failed probes cost about 2% of the time, further
apart after each failure and sooner after a success, so it notices when acceptance rises again.
"""

from __future__ import annotations

from typing import Protocol


class SizeCost:
    """Seconds as a function of a size (tokens drafted, or verification batch size), learnt online.

    Each size keeps a robust running mean (each observation is clipped to [1/2, 2] times the current mean
    before an exponential update, so one preempted step moves it by at most `alpha`). Sizes with at least
    `trusted` observations answer with their own mean; other sizes with a weighted least-squares line
    a + b * size through the observed means. With a single observed size, `fixed_share` (the share of the
    cost at size 1 that does not grow with size) sets the line's slope.
    """

    def __init__(self, fixed_share: float, *, alpha: float = 0.2, trusted: int = 3, max_weight: int = 16):
        self.fixed_share = fixed_share
        self.alpha = alpha
        self.trusted = trusted
        self.max_weight = max_weight
        self._mean: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._line: tuple[float, float] | None = None

    @property
    def known(self) -> bool:
        """Whether anything has been observed."""
        return bool(self._mean)

    def observe(self, size: int, seconds: float) -> None:
        """One measurement: `seconds` spent on `size`."""
        if size < 0 or seconds <= 0.0:
            return
        m = self._mean.get(size)
        if m is None:
            self._mean[size] = seconds
        else:
            x = min(max(seconds, 0.5 * m), 2.0 * m)
            self._mean[size] = m + self.alpha * (x - m)
        self._count[size] = self._count.get(size, 0) + 1
        self._line = None

    def __call__(self, size: int) -> float:
        """Estimated seconds for `size` (0.0 when nothing has been observed)."""
        if self._count.get(size, 0) >= self.trusted:
            return self._mean[size]
        a, b = self.line()
        return a + b * size

    def line(self) -> tuple[float, float]:
        """(a, b) of the fitted line a + b * size, both >= 0; recomputed only after new observations."""
        if self._line is None:
            self._line = self._fit()
        return self._line

    def _fit(self) -> tuple[float, float]:
        if not self._mean:
            return 0.0, 0.0
        w_sum = sx = sy = sxx = sxy = 0.0
        for size, y in self._mean.items():
            w = min(self._count[size], self.max_weight)
            w_sum += w
            sx += w * size
            sy += w * y
            sxx += w * size * size
            sxy += w * size * y
        den = w_sum * sxx - sx * sx
        if len(self._mean) == 1 or den <= 1e-12 * max(w_sum * sxx, 1.0):
            return self._one_point(sx / w_sum, sy / w_sum)
        b = (w_sum * sxy - sx * sy) / den
        a = (sy - b * sx) / w_sum
        if b < 0.0:
            return sy / w_sum, 0.0
        if a < 0.0:
            return 0.0, sxy / sxx
        return a, b

    def _one_point(self, x: float, y: float) -> tuple[float, float]:
        """The line through (x, y) whose fixed part is `fixed_share` of its value at size 1."""
        s = self.fixed_share
        den = s + (1.0 - s) * x
        if den <= 0.0:  # only size 0 seen and no fixed share: assume a token costs what the overhead did
            return y, y
        return s * y / den, (1.0 - s) * y / den


class CostModel:
    """Measured costs of drafting and verifying, shared by the generations of one drafter."""

    def __init__(self) -> None:
        self.draft = SizeCost(fixed_share=0.0)
        """Seconds of one propose() call by tokens drafted (a model draft costs about one decode a token)."""
        self.verify = SizeCost(fixed_share=0.9)
        """Seconds of one verification by batch size (k + 1); a batch costs little more than one token."""

    @property
    def ready(self) -> bool:
        """Whether both costs have been measured at least once."""
        return self.draft.known and self.verify.known

    def observe_draft(self, n_tokens: int, seconds: float) -> None:
        self.draft.observe(n_tokens, seconds)

    def observe_verify(self, batch_size: int, seconds: float) -> None:
        self.verify.observe(batch_size, seconds)

    def draft_cost(self, k: int) -> float:
        """Seconds to draft k tokens (0 for k = 0: no propose() call)."""
        return self.draft(k) if k > 0 else 0.0

    def verify_cost(self, batch_size: int) -> float:
        """Seconds to verify a batch of batch_size tokens in one decode."""
        return self.verify(batch_size)


class DraftPolicy(Protocol):
    """Chooses each step's draft length and learns from the verification's outcome."""

    def choose(self, max_k: int) -> int:
        """How many tokens to draft this step, at most max_k (0: a plain step)."""

    def observe(self, drafted: int, accepted: int) -> None:
        """The step's outcome: drafted tokens offered for verification, the first `accepted` accepted."""


class FixedPolicy:
    """Always drafts as many tokens as allowed (--draft-policy fixed)."""

    def __init__(self, draft_max: int):
        self.draft_max = draft_max

    def choose(self, max_k: int) -> int:
        return max(0, min(max_k, self.draft_max))

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing to learn."""


class AdaptivePolicy:
    """Picks the draft length with the most expected tokens per second, per sequence.

    Acceptance at position i is an exponentially weighted count (`decay` per observation, `idle_decay` per
    plain step) shrunk towards a prior: `prior` at position 1 and the estimate at position i-1 for
    position i, each worth `prior_weight` observations. A token the drafter declined to produce
    (confidence below --draft-p-min, no n-gram match) counts as not accepted: it gained nothing.

    Probes: while k = 0 wins, a probe of `probe_k` tokens is drafted every N plain steps, where N makes a
    failed probe's extra time `probe_budget` of the plain time in between, times 2**level: each failed
    probe raises the level by 1 (up to `levels[1]`), each successful one lowers it by 2 (down to
    `levels[0]`, also where a sequence starts, so a new sequence probes early) and is confirmed by
    another probe at the next plain step, so a rise in acceptance is confirmed within a few steps.
    """

    def __init__(self, cost: CostModel, draft_max: int, *, draft_min: int = 0, prior: float = 0.5,
                 prior_weight: float = 2.0, decay: float = 0.95, idle_decay: float = 0.99, probe_k: int = 1,
                 probe_budget: float = 0.02, levels: tuple[int, int] = (-4, 2), probe_max: int = 256):
        self.cost = cost
        self.draft_max = draft_max
        self.draft_min = draft_min
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self.idle_decay = idle_decay
        self.probe_k = probe_k
        self.probe_budget = probe_budget
        self.levels = levels
        self.probe_max = probe_max
        self._hits = [0.0] * draft_max   # decayed accepted counts per draft position
        self._seen = [0.0] * draft_max   # decayed observation counts per draft position
        self._asked = 0                  # k chosen for the current step
        self._probing = False            # the current step is a probe
        self._level = levels[0]          # probe interval exponent
        self._streak = 0                 # plain steps since the last draft or probe
        self._confirm = False            # the last probe succeeded: probe again at the next plain step

    def acceptance(self) -> list[float]:
        """Estimated conditional acceptance per draft position (1-based position i at index i-1)."""
        est: list[float] = []
        prior, w0 = self.prior, self.prior_weight
        for hits, seen in zip(self._hits, self._seen):
            prior = (hits + w0 * prior) / (seen + w0)
            est.append(prior)
        return est

    def best(self, max_k: int) -> int:
        """The k in {0} U [draft_min, max_k] with the most expected tokens per second (ties: smaller k)."""
        hi = min(max_k, self.draft_max)
        best_k, best_rate = 0, 1.0 / max(self.cost.verify_cost(1), 1e-9)
        tokens = reach = 1.0
        for k, a in enumerate(self.acceptance()[:hi], start=1):
            reach *= a
            tokens += reach
            if k < self.draft_min:
                continue
            rate = tokens / max(self.cost.draft_cost(k) + self.cost.verify_cost(k + 1), 1e-9)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def probe_interval(self, k: int) -> float:
        """Plain steps between probes of k tokens at the current level."""
        plain = max(self.cost.verify_cost(1), 1e-9)
        extra = max(self.cost.draft_cost(k) + self.cost.verify_cost(k + 1) - plain, 0.0) / plain
        return min(self.probe_max, max(1.0, extra / self.probe_budget * 2.0 ** self._level))

    def choose(self, max_k: int) -> int:
        hi = min(max_k, self.draft_max)
        lo = max(1, self.draft_min)
        self._probing = False
        if hi < lo:
            self._asked = 0
        elif not self.cost.ready:
            self._asked = self._probe_size(lo, hi)  # cold start: measure what drafting costs
        else:
            self._asked = self.best(hi)
            if self._asked > 0:
                self._streak, self._confirm = 0, False
            else:
                self._scale(self.idle_decay)
                self._streak += 1
                k = self._probe_size(lo, hi)
                if self._streak >= (1 if self._confirm else self.probe_interval(k)):
                    self._streak, self._probing, self._asked = 0, True, k
        return self._asked

    def observe(self, drafted: int, accepted: int) -> None:
        """Learn from the step's outcome; positions after the first failure are not observed."""
        asked = self._asked
        if asked <= 0:
            return
        g = self.decay
        for i in range(min(accepted + 1, asked)):
            self._seen[i] = g * self._seen[i] + 1.0
            self._hits[i] = g * self._hits[i] + (1.0 if i < accepted else 0.0)
        if self._probing:
            ok = drafted > 0 and accepted == drafted
            lo, hi = self.levels
            self._level = max(lo, self._level - 2) if ok else min(hi, self._level + 1)
            self._probing, self._confirm = False, ok

    def _scale(self, g: float) -> None:
        """Weigh the acceptance evidence so far by g."""
        self._hits = [g * h for h in self._hits]
        self._seen = [g * n for n in self._seen]

    def _probe_size(self, lo: int, hi: int) -> int:
        return min(hi, max(lo, self.probe_k))


POLICIES = ("adaptive", "fixed")
"""Values of --draft-policy."""


def make_policy(name: str, cost: CostModel, draft_max: int, *, draft_min: int = 0) -> DraftPolicy:
    """The policy called `name` ("adaptive" or "fixed")."""
    if name == "fixed":
        return FixedPolicy(draft_max)
    if name == "adaptive":
        return AdaptivePolicy(cost, draft_max, draft_min=draft_min)
    raise ValueError(f"unknown draft policy {name!r}; expected one of {POLICIES}")
