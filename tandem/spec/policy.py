"""How many tokens to draft each step: the number k (0 included) with the most expected tokens per second.

Per step, with a per-position acceptance profile a_1..a_k (a_i: chance that draft token i is accepted
given that tokens 1..i-1 were), a step that drafts k tokens yields on average

    tokens(k) = 1 + sum_{j<=k} prod_{i<=j} a_i        and costs    time(k) = draft_cost(k) + verify_cost(k+1)

and the policy picks the k in {0} U [draft_min, max_k] maximising tokens(k) / time(k). k = 0 is a plain
step (one single-token decode).

Under load (a scheduler's step decodes `load` sequences together and each one's drafting stalls them all), the
rate that counts is the batch's: drafting k tokens for one sequence makes the step yield load - 1 + tokens(k)
tokens in draft_cost(k) + verify_cost(load + k) seconds, against load tokens in verify_cost(load) for a plain
step. At load 1 this is the rule above; with more sequences, verification rows are no longer almost free and
each sequence's draft time is everyone's, so the policy drafts less, down to 0. Costs are measured online (`CostModel`, shared across requests);
acceptance is estimated per sequence (`AdaptivePolicy`, new per request). When no k > 0 pays, the policy
still drafts a small probe now and then, spaced so that failed probes cost about 2% of the time, further
apart after each failure and sooner after a success, so it notices when acceptance rises again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from tandem.spec.costs import CostModel


class DraftPolicy(Protocol):
    """Chooses each step's draft length and learns from the verification's outcome."""

    def choose(self, max_k: int, backlog: int = 0, load: int = 1) -> int:
        """How many tokens to draft this step, at most max_k (0: a plain step); `backlog`: tokens the drafter
        would first have to catch up on; `load`: sequences decoded in the same step (this one included)."""

    def expects_draft(self, max_k: int, load: int = 1) -> bool:
        """Whether the first step of a sequence will draft (then the drafter catches up on the prompt at once)."""

    def observe(self, drafted: int, accepted: int) -> None:
        """The step's outcome: drafted tokens offered for verification, the first `accepted` accepted."""

    def observe_time(self, drafted: int, tokens: int, seconds: float) -> None:
        """The step's wall time (draft + verify) and the tokens it yielded."""


class FixedPolicy:
    """Always drafts as many tokens as allowed (--draft-policy fixed)."""

    def __init__(self, draft_max: int):
        self.draft_max = draft_max

    def choose(self, max_k: int, backlog: int = 0, load: int = 1) -> int:
        return max(0, min(max_k, self.draft_max))

    def expects_draft(self, max_k: int, load: int = 1) -> bool:
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
    at perfect acceptance) drafting lost 13% in practice (0.87x measured).

    Probes: while k = 0 wins, a probe is drafted every N plain steps, where N makes a failed probe's extra
    time `probe_budget` of the plain time in between, times 2**level: each failed probe raises the level by
    1 (up to `levels[1]`), each successful one lowers it by 2 (down to `levels[0]`, also where a drafter
    without acceptance history starts, probing at its first step) and is confirmed by a probe twice as long at
    the next plain step, so a rise in acceptance is confirmed within a few steps and a new drafter ramps
    up 1, 2, 4, 8... tokens. A probe is the shortest length (at least `probe_k`) whose success would show
    that drafting pays: with an expensive draft a 1-token probe cannot (an F16 main with a Q4_1 draft),
    and such probes, never confirmed nor backed off, had cost 24% of a new drafter's first request.
    Under load (a step shared with other sequences) probes are never eager: no confirmations, level >= 0.
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

    def best(self, max_k: int, acceptance: list[float] | None = None, load: int = 1) -> int:
        """The k in {0} U [draft_min, max_k] with the most expected tokens per second (ties: smaller k),
        under the estimated acceptance (or the one given), for a step of `load` sequences."""
        best_k, best_rate = 0, self._plain_rate(load)
        for k, rate in self._rates(min(max_k, self.draft_max), acceptance, load):
            if k >= self.draft_min and self.cost.bias * rate > best_rate:
                best_k, best_rate = k, self.cost.bias * rate
        return best_k

    def _plain_rate(self, load: int = 1) -> float:
        """What drafting must beat: the step's tokens per second without it, times the margin."""
        return self.margin * load / max(self.cost.verify_cost(load), 1e-9)

    def _rates(self, hi: int, acceptance: list[float] | None = None,
               load: int = 1) -> Iterator[tuple[int, float]]:
        """(k, expected tokens per second of a step in which this sequence drafts k tokens and `load` - 1 others
        decode one row each) for k = 1..hi, before the bias correction."""
        tokens = reach = 1.0
        others = max(load, 1) - 1
        for k, a in enumerate((self.acceptance() if acceptance is None else acceptance)[:hi], start=1):
            reach *= a
            tokens += reach
            yield k, (others + tokens) / max(self.cost.draft_cost(k) + self.cost.verify_cost(others + k + 1), 1e-9)

    def probe_interval(self, k: int, backlog: int = 0, load: int = 1) -> float:
        """Plain steps between probes of k tokens at the current level, when the drafter first has to catch
        up on `backlog` tokens it has not seen (the prompt, at a sequence's first draft). Under load each of the
        `load` sequences probes on its own and a probe stalls them all, so each probes `load` times as rarely."""
        load = max(load, 1)
        plain = max(self.cost.verify_cost(load), 1e-9) / load
        extra = max(self.cost.draft_cost(k) + self.cost.verify_cost(load + k) - self.cost.verify_cost(load), 0.0)
        catch_up = backlog * self.cost.catch_up
        # A catch-up is paid in full whatever the probe shows, so it gets the plain budget, not the eager one
        # that successful probes earn (F16 code-edit: a 141-token catch-up per probe cost 27%).
        # Under load, eager probing (a negative level) is off: a probe that succeeds at moderate acceptance shows
        # only that drafting pays alone, and its confirmations stalled the whole batch (3% at 2 sequences).
        level = max(self._level, 0) if catch_up > extra or load > 1 else self._level
        return min(self.probe_max, max(1.0, (extra + catch_up) / plain / self.probe_budget * 2.0 ** level))

    def choose(self, max_k: int, backlog: int = 0, load: int = 1) -> int:
        """Draft length for this step; `backlog` is how many tokens the drafter would first have to catch up on,
        `load` how many sequences the step decodes (this one included)."""
        hi = min(max_k, self.draft_max)
        lo = max(1, self.draft_min)
        self._probing = False
        if hi < lo:
            self._asked = 0
        elif not self.cost.ready:
            self._asked = self._probe_size(lo, hi)  # cold start: measure what drafting costs
        else:
            self._asked = self.best(hi, load=load)
            if self._asked > 0:
                self._streak, self._confirm = 0, False
            else:
                self._scale(self.idle_decay)
                self._streak += 1
                # When no draft length would pay even if every token were accepted, probe rarely (to notice
                # cost changes). When the probe's own length would not pay, a success is no reason to
                # probe again at once: chaining such confirmations drafted every other step at a loss.
                k = self._probe_size(lo, hi)
                paying = self._paying_length(k, hi, load)
                self._probe_pays = paying is not None
                if paying is None:
                    self._confirm = False
                    self._level = self.levels[1]
                else:  # the shortest probe whose success shows that drafting can pay; a confirmation doubles it
                    k = min(hi, max(paying, self._next_probe if self._confirm else 0))
                eager = load == 1 and (self._confirm or (self._fresh and paying is not None))
                due = 1 if eager else self.probe_interval(k, backlog, load)
                if self._streak >= due:
                    self._fresh = False
                    self._streak, self._probing, self._asked = 0, True, k
        self._predicted = self.predicted_rate(self._asked) if self._asked > 0 and self.cost.ready else 0.0
        return self._asked

    def expects_draft(self, max_k: int, load: int = 1) -> bool:
        """Whether the first step will draft: the costs are known and some length pays at the prior acceptance."""
        return self.cost.ready and self.best(min(max_k, self.draft_max), load=load) > 0

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

    def _paying_length(self, lo: int, hi: int, load: int = 1) -> int | None:
        """The smallest k in [lo, hi] that would beat plain decoding if every draft token were accepted."""
        plain = self._plain_rate(load)
        for k, rate in self._rates(hi, [1.0] * hi, load):
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
