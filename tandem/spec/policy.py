"""How many tokens to draft each step: the number k (0 included) with the most expected tokens per second.

Per step, with a per-position acceptance profile a_1..a_k (a_i: chance that draft token i is accepted
given that tokens 1..i-1 were), a step that drafts k tokens yields on average

    tokens(k) = 1 + sum_{j<=k} prod_{i<=j} a_i        and costs    time(k) = draft_cost(k) + verify_cost(k+1)

and the policy picks the k in {0} U [draft_min, max_k] maximising tokens(k) / time(k); k = 0 is a plain step.
Under load (a scheduler's step decodes `load` sequences together and each one's drafting stalls them all) the
rate is the batch's: load - 1 + tokens(k) tokens in draft_cost(k) + verify_cost(load + k) seconds.

The controller is a bandit over draft lengths whose arms it cannot observe without pulling them: acceptance is
only seen on drafting steps. So exploration must not starve: every sequence opens with a probe (one request's bad
luck does not decide the next one's first steps); within a sequence, a plain streak ends in a probe after at most
`max_streak` plain steps whatever the estimates say, while the drafter has little to read first; and a sequence's
own failures fade, so its estimate returns to the drafter's long-run one and drafting resumes where that pays.
What the drafter must read before it can draft (a long prompt, a long plain streak) is paid only when the rest of
the request can pay it back: at full acceptance for the opening probe, at the estimate otherwise (a catch-up per
probe, whatever the spacing, cost a sequence whose drafts fail 15% of plain decoding on the default pair).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from tandem.spec.costs import CostModel


class DraftPolicy(Protocol):
    """Chooses each step's draft length and learns from the verification's outcome."""

    def choose(self, max_k: int, backlog: int = 0, load: int = 1, remaining: int | None = None) -> int:
        """How many tokens to draft this step, at most max_k (0: a plain step); `backlog`: tokens the drafter
        would first have to catch up on; `load`: sequences decoded in the same step (this one included);
        `remaining`: tokens the request may still generate (None: unbounded)."""

    def expects_draft(self, max_k: int, load: int = 1, backlog: int = 0, remaining: int | None = None) -> bool:
        """Whether the first step of a sequence will draft (then the drafter catches up on the prompt at once)."""

    def observe(self, drafted: int, accepted: int) -> None:
        """The step's outcome: drafted tokens offered for verification, the first `accepted` accepted."""

    def defer(self) -> None:
        """The length chosen this step was not drafted (the drafter was still reading its backlog): the next
        step chooses as if this one had not."""


class FixedPolicy:
    """Always drafts as many tokens as allowed (--draft-policy fixed)."""

    def __init__(self, draft_max: int):
        self.draft_max = draft_max

    def choose(self, max_k: int, backlog: int = 0, load: int = 1, remaining: int | None = None) -> int:
        return max(0, min(max_k, self.draft_max))

    def expects_draft(self, max_k: int, load: int = 1, backlog: int = 0, remaining: int | None = None) -> bool:
        return self.choose(max_k) > 0

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing to learn."""

    def defer(self) -> None:
        """Nothing to undo."""


@dataclass(frozen=True)
class PolicyConstants:
    """The adaptive policy's few constants (one object, so tests and benchmarks can vary them)."""

    prior: float = 0.6
    """Acceptance assumed for a drafter with no record: optimistic on purpose (a pessimistic prior is never
    corrected where drafting stops)."""
    prior_weight: float = 2.0
    """Observations the prior is worth against the drafter's long-run record, and the long run against a
    sequence's own: two rejections move a fresh estimate about halfway."""
    decay: float = 0.95
    """Weight of a sequence's older observations per new one (about twenty steps of memory): acceptance changes
    within a request (code, then prose)."""
    idle_decay: float = 0.97
    """Weight of a sequence's observations per plain step: while it does not draft, its own record fades and its
    estimate returns to the drafter's long-run one (half-way in about 23 steps), so a few unlucky drafts do not
    stop a sequence for longer than the long run justifies; a faster fade (0.95) sends a sampled request whose
    drafts fail back to the regime's mixed estimate, and it pays a catch-up to draft again every 15-20 steps."""
    optimism: float = 0.5
    """Standard deviations added to each acceptance estimate when choosing a length (an upper confidence bound):
    an estimate resting on a few observations gets the benefit of the doubt, so one early rejection does not stop
    a sequence whose drafts pay; a well-observed low acceptance still stops it."""
    margin: float = 1.1
    """A draft length must promise this many times the plain rate: the estimates are noisy and a drafting step
    costs bookkeeping the cost model does not see; where the best case is within 10% of plain decoding,
    drafting lost in practice (an F16 main with a Q4_1 draft on 2 cores: 0.87x)."""
    probe_budget: float = 0.03
    """Share of plain-decoding time failed probes may cost: a probe's extra time over a plain step sets the
    plain steps before it (at least 1)."""
    strong_record: float = 4.0
    """Checked draft tokens (decayed) from which the drafter's long-run record of a regime decides a sequence's
    opening probe: below it the probe is made whenever drafting could pay back the prompt's catch-up at full
    acceptance; from it, only where the estimate says so (an opening probe costs the prompt's catch-up, 0.1-0.2 s
    on the default pair, which requests at temperature 0.7 with a record of failures paid for nothing)."""
    max_skipped_openings: int = 4
    """Sequences of a regime in a row that may skip their opening probe: then the next one probes whatever the
    record says, so a record of failures (which nothing refreshes while sequences skip) cannot lock a regime out."""
    max_streak: int = 64
    """Most plain steps between probes, whatever the costs and failures: drafting resumes within this many
    steps of becoming worth it. A failed probe doubles the spacing up to here; a success ends the back-off."""


DEFAULTS = PolicyConstants()


class AdaptivePolicy:
    """Picks the draft length with the most expected tokens per second, for one sequence.

    Acceptance is one rate a for every draft position (a checked token is accepted with chance a whatever its
    position: per-position estimates starved, since a position is seen only when the ones before it were
    drafted and accepted, and a sequence stuck at short drafts never learnt that longer ones pay). It is the
    sequence's decayed record shrunk towards the drafter's long-run record (CostModel.long_run, shared by its
    sequences), itself shrunk towards the constants' prior. Lengths are chosen on the estimate plus `optimism`
    standard deviations. A token the drafter declined to produce (confidence below --draft-p-min, no n-gram
    match) counts as not accepted: it gained nothing.

    While no length pays, the sequence decodes plain steps and probes: at its first chance (every sequence
    opens with a probe), then after `probe_interval` plain steps, which doubles with each failed probe up to
    `max_streak`. A probe drafts the shortest length that would pay if accepted; a successful probe is followed
    at the next plain step by one twice as long, so a drafter ramps up 1, 2, 4, 8... tokens until its estimate
    says drafting pays on its own.
    """

    def __init__(self, cost: CostModel, draft_max: int, *, draft_min: int = 0, regime: str = "greedy",
                 constants: PolicyConstants = DEFAULTS):
        self.cost = cost
        self.regime = regime
        """The sequence's sampling regime (see `regime`): whose long-run acceptance it starts from."""
        self.draft_max = draft_max
        self.draft_min = draft_min
        self.c = constants
        self._hits = 0.0                 # decayed count of this sequence's accepted draft tokens
        self._seen = 0.0                 # ... and of its checked ones
        self._asked = 0                  # k chosen for the current step
        self._probing = False            # the current step is a probe
        self._opened = False             # the sequence's opening probe (or first draft) is done
        self._first = True               # no step chosen yet
        self._streak = 0                 # plain steps since the last draft or probe
        self._fails = 0                  # failed probes since the last success (the back-off exponent)
        self._next_probe = 0             # after a successful probe: the next one's length (twice it), else 0
        self._before = (False, 0, 0)     # (_opened, _streak, _next_probe) before this step's choice (defer())

    def rate_estimate(self) -> tuple[float, float]:
        """(a, n): the estimated acceptance of a draft token and the observations it rests on (the sequence's,
        plus the prior's weight)."""
        w = self.c.prior_weight
        long_hits, long_seen = self.cost.long_run(self.regime)
        prior = (long_hits + w * self.c.prior) / (long_seen + w)  # the long run, shrunk to the constant prior
        return (self._hits + w * prior) / (self._seen + w), self._seen + w

    def acceptance(self) -> list[float]:
        """Estimated conditional acceptance per draft position (1-based position i at index i-1)."""
        return [self.rate_estimate()[0]] * self.draft_max

    def optimistic(self) -> list[float]:
        """The acceptance estimates plus `optimism` standard deviations (at most 1)."""
        a, n = self.rate_estimate()
        return [min(1.0, a + self.c.optimism * math.sqrt(a * (1.0 - a) / n))] * self.draft_max

    def best(self, max_k: int, acceptance: list[float] | None = None, load: int = 1) -> int:
        """The k in {0} U [draft_min, max_k] with the most expected tokens per second (ties: smaller k), under the
        estimated acceptance (or the one given), for a step of `load` sequences; k > 0 must beat plain by the
        margin."""
        best_k, best_rate = 0, self.c.margin * self._plain_rate(load)
        for k, rate in self._rates(min(max_k, self.draft_max), acceptance or self.optimistic(), load):
            if k >= self.draft_min and rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def _plain_rate(self, load: int = 1) -> float:
        """The step's tokens per second without drafting."""
        return load / max(self.cost.verify_cost(load), 1e-9)

    def _rates(self, hi: int, acceptance: list[float] | None = None, load: int = 1) -> Iterator[tuple[int, float]]:
        """(k, expected tokens per second of a step in which this sequence drafts k tokens and `load` - 1 others
        decode one row each) for k = 1..hi."""
        tokens = reach = 1.0
        others = max(load, 1) - 1
        for k, a in enumerate((self.acceptance() if acceptance is None else acceptance)[:hi], start=1):
            reach *= a
            tokens += reach
            yield k, (others + tokens) / max(self.cost.draft_cost(k) + self.cost.verify_cost(others + k + 1), 1e-9)

    def rate(self, k: int, acceptance: list[float] | None = None, load: int = 1) -> float:
        """Expected tokens per second of a step drafting k tokens (the plain rate for k = 0)."""
        return dict(self._rates(k, acceptance, load)).get(k, 0.0) if k > 0 else self._plain_rate(load)

    def probe_interval(self, k: int, load: int = 1) -> int:
        """Plain steps before a probe of k tokens: its extra time over a plain step is `probe_budget` of the plain
        time in between, times 2 per failed probe since the last success, at most `max_streak`. Under load each
        of the `load` sequences probes on its own and a probe stalls them all, so each probes `load` times as
        rarely (and the bound is `load` times as long)."""
        load = max(load, 1)
        plain = max(self.cost.verify_cost(load), 1e-9) / load
        extra = max(self.cost.draft_cost(k) + self.cost.verify_cost(load + k) - self.cost.verify_cost(load), 0.0)
        steps = max(1.0, extra / plain / self.c.probe_budget) * load * 2.0 ** self._fails
        return int(min(self.c.max_streak * load, steps))

    def catch_up_pays(self, k: int, acceptance: list[float] | None, backlog: int, remaining: int | None,
                      load: int = 1) -> bool:
        """Whether reading `backlog` unseen tokens (the drafter's catch-up) before drafting k tokens can be paid
        back by the time drafting saves on the `remaining` tokens at that acceptance (full acceptance: a probe's
        best case). A 3,000-token prompt costs a 0.5B draft about 20 s, which 160 tokens cannot pay back."""
        if backlog <= 2 or remaining is None:
            return True
        rate = self.rate(k, acceptance, load)
        if rate <= self._plain_rate(load):
            return False
        saved = remaining * (1.0 / self._plain_rate(load) - 1.0 / rate)
        return backlog * self.cost.catch_up < saved

    def choose(self, max_k: int, backlog: int = 0, load: int = 1, remaining: int | None = None) -> int:
        """Draft length for this step (see the class docstring)."""
        hi = min(max_k, self.draft_max)
        lo = max(1, self.draft_min)
        self._probing, self._asked = False, 0
        self._choose(hi, lo, backlog, load, remaining)
        if self._first and self.cost.ready:  # count the sequences of this regime that skip their opening probe
            skipped = self.cost.skipped_openings
            skipped[self.regime] = 0 if self._asked > 0 else skipped.get(self.regime, 0) + 1
        self._first = False
        return self._asked

    def defer(self) -> None:
        """Undo this step's choice (see DraftPolicy.defer): a probe stays due, counted as one more plain step."""
        self._opened, self._streak, self._next_probe = self._before
        self._streak += 1
        self._probing, self._asked = False, 0

    def _choose(self, hi: int, lo: int, backlog: int, load: int, remaining: int | None) -> None:
        self._before = (self._opened, self._streak, self._next_probe)
        if hi < lo:
            return
        if not self.cost.ready:  # cold start: measure what drafting costs
            self._asked = lo
            return
        k = self.best(hi, load=load)
        if k > 0 and self.catch_up_pays(k, None, backlog, remaining, load):
            self._asked, self._streak, self._opened, self._next_probe = k, 0, True, 0
            return
        self._streak += 1
        self._hits *= self.c.idle_decay
        self._seen *= self.c.idle_decay
        probe = self._probe_length(lo, hi, load)
        if probe is None:
            # No length would pay even fully accepted, by these estimates: probe at the bound only, to notice that
            # the estimates were wrong (a cost measured during a stall) or that costs changed.
            if self._streak >= self.c.max_streak and backlog <= 2 * self.c.max_streak:  # (not a whole prompt)
                self._asked, self._probing, self._streak, self._opened = lo, True, 0, True
            return
        if not self._opened or (self._next_probe and load == 1):
            # Open the sequence, or confirm a success, at once (not under load: a success at moderate acceptance
            # shows only that drafting pays alone, and confirmations stalled the whole batch).
            probe, due = min(hi, max(probe, self._next_probe)), 1
        else:
            due = self.probe_interval(probe, load)
        # The drafter must first read what it has not seen: the opening probe pays for it if drafting could pay it
        # back at full acceptance (while the regime's record is weak), any other probe at the optimistic estimate.
        acceptance = self._probe_acceptance(probe) if not self._opened else self.optimistic()
        if self._streak >= due and self.catch_up_pays(probe, acceptance, backlog, remaining, load):
            self._asked, self._probing, self._streak, self._opened = probe, True, 0, True

    def expects_draft(self, max_k: int, load: int = 1, backlog: int = 0, remaining: int | None = None) -> bool:
        """Whether the first step will draft or probe (costs measured, and the catch-up on `backlog` can pay)."""
        hi = min(max_k, self.draft_max)
        if not self.cost.ready or hi < max(1, self.draft_min):
            return False
        k = self.best(hi, load=load)
        if k > 0:
            return self.catch_up_pays(k, None, backlog, remaining, load)
        probe = self._probe_length(max(1, self.draft_min), hi, load)
        return probe is not None and self.catch_up_pays(probe, self._probe_acceptance(probe), backlog, remaining,
                                                        load)

    def _probe_acceptance(self, probe: int) -> list[float]:
        """The acceptance an opening probe's catch-up is priced at: full while the regime's record is weak, or
        after `max_skipped_openings` sequences skipped theirs."""
        weak = self.cost.long_run(self.regime)[1] < self.c.strong_record
        if weak or self.cost.skipped_openings.get(self.regime, 0) >= self.c.max_skipped_openings:
            return [1.0] * probe
        return self.optimistic()

    def observe(self, drafted: int, accepted: int) -> None:
        """Learn from the step's outcome; positions after the first failure are not observed."""
        asked = self._asked
        if asked <= 0:
            return
        g = self.c.decay
        for i in range(min(accepted + 1, asked)):
            self._seen = g * self._seen + 1.0
            self._hits = g * self._hits + (1.0 if i < accepted else 0.0)
        if self._probing:
            ok = drafted > 0 and accepted == drafted
            self._fails = 0 if ok else self._fails + 1
            self._next_probe = 2 * drafted if ok else 0
            self._probing = False

    def _probe_length(self, lo: int, hi: int, load: int = 1) -> int | None:
        """The smallest k in [lo, hi] that would beat plain decoding (by the margin) if every token were accepted:
        a shorter probe's success would not show that drafting pays (with an expensive draft a 1-token step
        cannot pay)."""
        plain = self.c.margin * self._plain_rate(load)
        for k, rate in self._rates(hi, [1.0] * hi, load):
            if k >= lo and rate > plain:
                return k
        return None


POLICIES = ("adaptive", "fixed")
"""Values of --draft-policy."""


def regime(temperature: float) -> str:
    """The sampling regime whose acceptance a drafter learns apart: "greedy", "sampled" (temperature up to 1, the
    API's default) or "hot" (above 1). On the default pair a draft token is accepted about 9 times in 10 at greedy, 6 in 10 at
    0.7 and almost never at 2; one shared record made a hot request resume drafting at a loss every few dozen steps
    on the strength of greedy requests' successes."""
    if temperature <= 0.0:
        return "greedy"
    return "sampled" if temperature <= 1.0 else "hot"


def make_policy(name: str, cost: CostModel, draft_max: int, *, draft_min: int = 0,
                regime: str = "greedy") -> DraftPolicy:
    """The policy called `name` ("adaptive" or "fixed"), for a sequence of sampling `regime`."""
    if name == "fixed":
        return FixedPolicy(draft_max)
    if name == "adaptive":
        return AdaptivePolicy(cost, draft_max, draft_min=draft_min, regime=regime)
    raise ValueError(f"unknown draft policy {name!r}; expected one of {POLICIES}")
