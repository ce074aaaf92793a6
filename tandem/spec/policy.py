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

from collections.abc import Iterator
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
    """Measured costs of drafting and verifying, shared by the generations of one drafter, and the drafter's
    long-run acceptance per draft position (the prior a new sequence starts from)."""

    def __init__(self, *, accept_decay: float = 0.99) -> None:
        self.accept_decay = accept_decay
        """Weight of older acceptance observations per new one (about 100 steps of memory)."""
        self._hits: list[float] = []
        self._seen: list[float] = []
        self._catch_up: float | None = None
        """Seconds per token for the drafter to catch up on tokens it has not seen (batched; running mean).
        The first draft of a sequence pays it for the whole prompt, so a probe there costs far more than
        the draft itself (a 400-token prompt: 0.3 s, 20 plain F16 steps)."""
        self.bias = 1.0
        """Realized over predicted tokens/s of drafting steps (running mean): corrects the policy's
        estimates for what they miss (optimistic acceptance at rarely seen positions, per-step overhead)."""
        self.draft = SizeCost(fixed_share=0.4)
        """Seconds of one propose() call by tokens drafted. A model draft costs about one decode a token plus
        a catch-up decode of the tokens the last verification added (SmolLM2 Q4_1 on 2 cores: 18 ms for 1
        token, then 10.7 ms a token: 40% of the 1-token cost does not grow with k)."""
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

    def observe_catch_up(self, tokens: int, seconds: float, *, alpha: float = 0.2) -> None:
        """A draft after `tokens` unseen tokens took `seconds` more than drafting alone would have."""
        if tokens > 0 and seconds > 0.0:
            x = seconds / tokens
            self._catch_up = x if self._catch_up is None else self._catch_up + alpha * (x - self._catch_up)

    @property
    def catch_up(self) -> float:
        """Seconds per unseen token; until measured, a tenth of a one-token draft (a batched decode costs a
        small fraction of one-at-a-time decodes; a dict lookup for the n-gram drafter)."""
        return self._catch_up if self._catch_up is not None else 0.1 * self.draft_cost(1)

    def observe_step(self, predicted_rate: float, tokens: int, seconds: float, *, alpha: float = 0.1) -> None:
        """A drafting step yielded `tokens` in `seconds` where the policy expected `predicted_rate` tokens/s."""
        if predicted_rate > 0.0 and seconds > 0.0:
            ratio = min(max(tokens / seconds / predicted_rate, 0.25), 2.0)
            self.bias += alpha * (ratio - self.bias)

    def observe_accept(self, position: int, accepted: bool) -> None:
        """A draft token at 0-based `position` was checked (its predecessors were accepted)."""
        while len(self._seen) <= position:
            self._hits.append(0.0)
            self._seen.append(0.0)
        g = self.accept_decay
        self._seen[position] = g * self._seen[position] + 1.0
        self._hits[position] = g * self._hits[position] + (1.0 if accepted else 0.0)

    def long_run(self, position: int) -> tuple[float, float]:
        """(accepted, checked) decayed counts at 0-based `position` across this drafter's sequences."""
        if position < len(self._seen):
            return self._hits[position], self._seen[position]
        return 0.0, 0.0

    def draft_cost(self, k: int) -> float:
        """Seconds to draft k tokens (0 for k = 0: no propose() call)."""
        return self.draft(k) if k > 0 else 0.0

    def verify_cost(self, batch_size: int) -> float:
        """Seconds to verify a batch of batch_size tokens in one decode."""
        return self.verify(batch_size)


class DraftPolicy(Protocol):
    """Chooses each step's draft length and learns from the verification's outcome."""

    def choose(self, max_k: int, backlog: int = 0) -> int:
        """How many tokens to draft this step, at most max_k (0: a plain step); `backlog`: tokens the drafter
        would first have to catch up on."""

    def expects_draft(self, max_k: int) -> bool:
        """Whether the first step of a sequence will draft (then the drafter catches up on the prompt at once)."""

    def observe(self, drafted: int, accepted: int) -> None:
        """The step's outcome: drafted tokens offered for verification, the first `accepted` accepted."""

    def observe_time(self, drafted: int, tokens: int, seconds: float) -> None:
        """The step's wall time (draft + verify) and the tokens it yielded."""


class FixedPolicy:
    """Always drafts as many tokens as allowed (--draft-policy fixed)."""

    def __init__(self, draft_max: int):
        self.draft_max = draft_max

    def choose(self, max_k: int, backlog: int = 0) -> int:
        return max(0, min(max_k, self.draft_max))

    def expects_draft(self, max_k: int) -> bool:
        return self.choose(max_k) > 0

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing to learn."""

    def observe_time(self, drafted: int, tokens: int, seconds: float) -> None:
        """Nothing to learn."""


class AdaptivePolicy:
    """Picks the draft length with the most expected tokens per second, per sequence.

    Acceptance at position i is an exponentially weighted count (`decay` per observation, `idle_decay` per
    plain step) shrunk towards a prior worth `prior_weight` observations: the drafter's long-run acceptance
    at position i across earlier sequences (kept in the CostModel), itself shrunk the same way towards
    `prior` at position 1 and towards the estimate at position i-1 for position i. So a new request starts from
    what this drafter usually achieves instead of ramping up from 0.5 (which cost short answers most). A token the drafter declined to produce
    (confidence below --draft-p-min, no n-gram match) counts as not accepted: it gained nothing.

    A draft length must promise `margin` times the plain rate to be chosen: the estimates are noisy and
    slightly optimistic (a draft step also costs numpy and bookkeeping the cost model does not see), and
    where the best case is within 10% of plain decoding (an F16 main with a Q4_1 draft on 2 cores: 1.07x
    at perfect acceptance) drafting lost 13% in practice (0.87x measured, 2026-11-23).

    Probes: while k = 0 wins, a probe is drafted every N plain steps, where N makes a failed probe's extra
    time `probe_budget` of the plain time in between, times 2**level: each failed probe raises the level by
    1 (up to `levels[1]`), each successful one lowers it by 2 (down to `levels[0]`, also where a drafter
    without acceptance history starts, probing at its first step) and is confirmed by a probe twice as long at
    the next plain step, so a rise in acceptance is confirmed within a few steps and a new drafter ramps
    up 1, 2, 4, 8... tokens. A probe is the shortest length (at least `probe_k`) whose success would show
    that drafting pays: with an expensive draft a 1-token probe cannot (an F16 main with a Q4_1 draft),
    and such probes, never confirmed nor backed off, had cost 24% of a new drafter's first request.
    """

    def __init__(self, cost: CostModel, draft_max: int, *, draft_min: int = 0, prior: float = 0.5,
                 prior_weight: float = 2.0, decay: float = 0.95, idle_decay: float = 0.99, probe_k: int = 1,
                 probe_budget: float = 0.02, levels: tuple[int, int] = (-4, 2), probe_max: int = 256,
                 margin: float = 1.1):
        self.cost = cost
        self.margin = margin
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
        # Probe interval exponent: a drafter with a history (its cost model has seen verifications) starts at the
        # plain budget, since its long-run acceptance already informs the first choice; a new drafter
        # probes early. (Starting every request at levels[0] made short answers pay ~30% in probes.)
        self._level = 0 if cost.long_run(0)[1] > 0 else levels[0]
        self._fresh = cost.long_run(0)[1] == 0  # no acceptance history: probe at the first plain step
        self._streak = 0                 # plain steps since the last draft or probe
        self._confirm = False            # the last probe succeeded: probe again at the next plain step
        self._predicted = 0.0            # predicted_rate of the current step's k (0: not drafting)
        self._probe_pays = True          # the current probe's length would pay if fully accepted
        self._next_probe = 0             # length of the next confirmation probe (twice the last success)

    def acceptance(self) -> list[float]:
        """Estimated conditional acceptance per draft position (1-based position i at index i-1)."""
        est: list[float] = []
        prior, w0 = self.prior, self.prior_weight
        for i, (hits, seen) in enumerate(zip(self._hits, self._seen)):
            long_hits, long_seen = self.cost.long_run(i)
            prior = (long_hits + w0 * prior) / (long_seen + w0)  # the long run, shrunk to the chained prior
            prior = (hits + w0 * prior) / (seen + w0)
            est.append(prior)
        return est

    def best(self, max_k: int, acceptance: list[float] | None = None) -> int:
        """The k in {0} U [draft_min, max_k] with the most expected tokens per second (ties: smaller k),
        under the estimated acceptance (or the one given)."""
        best_k, best_rate = 0, self.margin / max(self.cost.verify_cost(1), 1e-9)
        for k, rate in self._rates(min(max_k, self.draft_max), acceptance):
            if k >= self.draft_min and self.cost.bias * rate > best_rate:
                best_k, best_rate = k, self.cost.bias * rate
        return best_k

    def _rates(self, hi: int, acceptance: list[float] | None = None) -> Iterator[tuple[int, float]]:
        """(k, expected tokens per second of drafting k tokens) for k = 1..hi, before the bias correction."""
        tokens = reach = 1.0
        for k, a in enumerate((self.acceptance() if acceptance is None else acceptance)[:hi], start=1):
            reach *= a
            tokens += reach
            yield k, tokens / max(self.cost.draft_cost(k) + self.cost.verify_cost(k + 1), 1e-9)

    def probe_interval(self, k: int, backlog: int = 0) -> float:
        """Plain steps between probes of k tokens at the current level, when the drafter first has to catch
        up on `backlog` tokens it has not seen (the prompt, at a sequence's first draft)."""
        plain = max(self.cost.verify_cost(1), 1e-9)
        extra = max(self.cost.draft_cost(k) + self.cost.verify_cost(k + 1) - plain, 0.0)
        catch_up = backlog * self.cost.catch_up
        # A catch-up is paid in full whatever the probe shows, so it gets the plain budget, not the eager one
        # that successful probes earn (F16 code-edit: a 141-token catch-up per probe cost 27%).
        level = max(self._level, 0) if catch_up > extra else self._level
        return min(self.probe_max, max(1.0, (extra + catch_up) / plain / self.probe_budget * 2.0 ** level))

    def choose(self, max_k: int, backlog: int = 0) -> int:
        """Draft length for this step; `backlog` is how many tokens the drafter would first have to catch up on."""
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
                # When no draft length would pay even if every token were accepted, probe rarely (to notice
                # cost changes). When the probe's own length would not pay, a success is no reason to
                # probe again at once: chaining such confirmations drafted every other step at a loss.
                k = self._probe_size(lo, hi)
                paying = self._paying_length(k, hi)
                self._probe_pays = paying is not None
                if paying is None:
                    self._confirm = False
                    self._level = self.levels[1]
                else:  # the shortest probe whose success shows that drafting can pay; a confirmation doubles it
                    k = min(hi, max(paying, self._next_probe if self._confirm else 0))
                due = 1 if self._confirm or (self._fresh and paying is not None) else self.probe_interval(k, backlog)
                if self._streak >= due:
                    self._fresh = False
                    self._streak, self._probing, self._asked = 0, True, k
        self._predicted = self.predicted_rate(self._asked) if self._asked > 0 and self.cost.ready else 0.0
        return self._asked

    def expects_draft(self, max_k: int) -> bool:
        """Whether the first step will draft: the costs are known and some length pays at the prior acceptance."""
        return self.cost.ready and self.best(min(max_k, self.draft_max)) > 0

    def predicted_rate(self, k: int) -> float:
        """Expected tokens per second of a step drafting k tokens, before the bias correction."""
        return dict(self._rates(k)).get(k, 0.0)

    def observe_time(self, drafted: int, tokens: int, seconds: float) -> None:
        """The step's wall time (draft + verify) and the tokens it yielded; only drafting steps teach."""
        if drafted > 0 and self._predicted > 0.0:
            self.cost.observe_step(self._predicted, tokens, seconds)

    def observe(self, drafted: int, accepted: int) -> None:
        """Learn from the step's outcome; positions after the first failure are not observed."""
        asked = self._asked
        if asked <= 0:
            return
        g = self.decay
        for i in range(min(accepted + 1, asked)):
            self._seen[i] = g * self._seen[i] + 1.0
            self._hits[i] = g * self._hits[i] + (1.0 if i < accepted else 0.0)
            self.cost.observe_accept(i, i < accepted)
        if self._probing:
            ok = drafted > 0 and accepted == drafted
            lo, hi = self.levels
            if not ok:
                self._level = min(hi, self._level + 1)
            elif self._probe_pays:  # a success at a length that cannot pay is no reason to probe more often
                self._level = max(lo, self._level - 2)
            self._probing, self._confirm = False, ok and self._probe_pays
            self._next_probe = 2 * drafted

    def _scale(self, g: float) -> None:
        """Weigh the acceptance evidence so far by g."""
        self._hits = [g * h for h in self._hits]
        self._seen = [g * n for n in self._seen]

    def _probe_size(self, lo: int, hi: int) -> int:
        return min(hi, max(lo, self.probe_k))

    def _paying_length(self, lo: int, hi: int) -> int | None:
        """The smallest k in [lo, hi] that would beat plain decoding if every draft token were accepted."""
        plain = self.margin / max(self.cost.verify_cost(1), 1e-9)
        for k, rate in self._rates(hi, [1.0] * hi):
            if k >= lo and self.cost.bias * rate > plain:
                return k
        return None


POLICIES = ("adaptive", "fixed")
"""Values of --draft-policy."""


def make_policy(name: str, cost: CostModel, draft_max: int, *, draft_min: int = 0) -> DraftPolicy:
    """The policy called `name` ("adaptive" or "fixed")."""
    if name == "fixed":
        return FixedPolicy(draft_max)
    if name == "adaptive":
        return AdaptivePolicy(cost, draft_max, draft_min=draft_min)
    raise ValueError(f"unknown draft policy {name!r}; expected one of {POLICIES}")
