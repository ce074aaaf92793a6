"""What drafting and verifying cost, measured online: by tokens per decode and by how full the KV cache is.

A decode's time grows with the number of tokens in it and with the KV cells its attention reads. On the
2-core CI machine the F32 SmolLM2-135M main verifies 17 tokens in 83 ms at KV position 200 and in 164 ms at
2,000, and a full-context Q4_1 draft's token goes from 10 to 20 ms over the same span. A cost model blind to
the position carried long-context costs into the next, short request: drafting looked like a loss there,
the policy stopped drafting, and every later 2,000-token generation ran at 0.7-0.8x of no draft (`tandem bench
window`). So costs are kept per KV bucket (`KvCost`).
"""

from __future__ import annotations

import math

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

    def count(self, size: int) -> int:
        """Observations of `size`."""
        return self._count.get(size, 0)

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


KV_BUCKET = 256
"""llama.cpp pads the KV cells a decode attends to up to a multiple of 256, so costs are step functions of
the position with this step; buckets are this wide up to KV_LINEAR cells, then 1/8 of an octave."""
KV_LINEAR = 4096


def kv_bucket(cells: int) -> int:
    """The cost bucket of a decode that attends to `cells` KV cells (its position plus its tokens)."""
    if cells <= KV_LINEAR:
        return max(cells - 1, 0) // KV_BUCKET
    return KV_LINEAR // KV_BUCKET + int(8 * math.log2(cells / KV_LINEAR))


class KvCost:
    """A SizeCost per KV bucket: seconds by decode size at the current position (`at`, in KV cells).

    A bucket reached for the first time starts from the nearest bucket already measured: it keeps a frozen
    table of that bucket's estimates, scaled by a running mean of how its own measurements compare with them
    (so a size seldom observed at long context, such as a plain step while every step drafts, still follows
    the growth seen at other sizes). Sizes the bucket itself has measured `trusted` times answer with their own
    mean. A bucket never reached answers from the nearest measured one.
    """

    def __init__(self, fixed_share: float, *, alpha: float = 0.2, trusted: int = 3, table: int = 64):
        self.fixed_share = fixed_share
        self.alpha = alpha
        self.trusted = trusted
        self.table = table
        """Sizes 0..table (or the largest size seen) are copied into a new bucket's starting table."""
        self.at = 0
        """KV cells in use before the decode to estimate or observe (set by CostModel.locate)."""
        self._own: dict[int, SizeCost] = {}
        self._base: dict[int, dict[int, float]] = {}  # the estimates a bucket started from, by size
        self._scale: dict[int, float] = {}
        self._largest = 0

    @property
    def known(self) -> bool:
        """Whether anything has been observed."""
        return bool(self._own)

    def buckets(self) -> list[int]:
        """The buckets measured so far."""
        return sorted(self._own)

    def _bucket(self, size: int) -> int:
        return kv_bucket(self.at + max(size, 1))

    def _nearest(self, b: int) -> int | None:
        return min(self._own, key=lambda x: (abs(x - b), -x), default=None)

    def _estimate(self, b: int, size: int) -> float:
        own, base = self._own[b], self._base.get(b)
        if base is None or size not in base or own.count(size) >= self.trusted:
            return own(size)
        return base[size] * self._scale[b]

    def observe(self, size: int, seconds: float) -> None:
        """One measurement: `seconds` spent on a decode of `size` tokens at the current position."""
        if size < 0 or seconds <= 0.0:
            return
        self._largest = max(self._largest, size)
        b = self._bucket(size)
        if b not in self._own:
            near = self._nearest(b)
            if near is not None:
                self._base[b] = {n: self._estimate(near, n) for n in range(max(self.table, self._largest) + 1)}
                self._scale[b] = 1.0
            self._own[b] = SizeCost(self.fixed_share, alpha=self.alpha, trusted=self.trusted)
        base = self._base.get(b)
        if base is not None and base.get(size, 0.0) > 0.0:
            m = self._scale[b]
            self._scale[b] = m + self.alpha * (min(max(seconds / base[size], 0.5 * m), 2.0 * m) - m)
        self._own[b].observe(size, seconds)

    def __call__(self, size: int) -> float:
        """Estimated seconds for a decode of `size` tokens at the current position (0.0 before any observation)."""
        b = self._bucket(size)
        if b not in self._own:
            b = self._nearest(b)
            if b is None:
                return 0.0
        return self._estimate(b, size)


class CostModel:
    """Measured costs of drafting and verifying, shared by the generations of one drafter, and the drafter's
    long-run acceptance (the prior a new sequence starts from)."""

    def __init__(self, *, accept_decay: float = 0.99) -> None:
        self.accept_decay = accept_decay
        """Weight of older acceptance observations per new one (about 100 draft tokens of memory)."""
        self._accept: dict[str, tuple[float, float]] = {}
        """Decayed counts of (accepted, checked) draft tokens by sampling regime (tandem.spec.policy.regime):
        a draft agrees with greedy decoding far more often than with a sample at temperature 0.7 or 2."""
        self._catch_up: float | None = None
        """Seconds per token for the drafter to catch up on tokens it has not seen (batched; running mean).
        The first draft of a sequence pays it for the whole prompt, so a probe there costs far more than
        the draft itself (a 400-token prompt: 0.3 s, 20 plain F16 steps)."""
        self.skipped_openings: dict[str, int] = {}
        """Sequences in a row, by sampling regime, that opened without a probe (see PolicyConstants)."""
        self.plain_streak = 0
        """Plain steps of this drafter's sequences since one of them last drafted (shown on /health)."""
        self.draft_steps = 0
        """Steps of its sequences that drafted (probes included)."""
        self.plain_steps = 0
        """Steps of its sequences that chose not to draft."""
        self.draft = KvCost(fixed_share=0.4)
        """Seconds of one propose() call by tokens drafted. A model draft costs about one decode a token plus
        a catch-up decode of the tokens the last verification added (SmolLM2 Q4_1 on 2 cores: 18 ms for 1
        token, then 10.7 ms a token: 40% of the 1-token cost does not grow with k)."""
        self.verify = KvCost(fixed_share=0.9)
        """Seconds of one verification by batch size (k + 1); a batch costs little more than one token."""

    def locate(self, main_kv: int, draft_kv: int = 0) -> None:
        """Where the next step runs: the KV cells the main model and the drafter hold before it. Estimates
        and observations refer to it until the next call."""
        self.verify.at, self.draft.at = main_kv, draft_kv

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

    def observe_choice(self, k: int) -> None:
        """A sequence's policy chose to draft k tokens this step (0: a plain step)."""
        if k > 0:
            self.draft_steps += 1
            self.plain_streak = 0
        else:
            self.plain_steps += 1
            self.plain_streak += 1

    def snapshot(self, *, sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 9, 17)) -> dict:
        """What the policy believes, as plain values (/health and /metrics): the long-run acceptance of a checked
        draft token and the (decayed) tokens it rests on, seconds per verification batch size and per draft length at the current position, the catch-up
        cost per token, and the step counts."""
        return {
            "acceptance": {r: round(h / n, 4) for r, (h, n) in sorted(self._accept.items()) if n > 0},
            "acceptance_weight": {r: round(n, 2) for r, (_h, n) in sorted(self._accept.items())},
            "verify_seconds": {n: round(self.verify_cost(n), 6) for n in sizes} if self.verify.known else {},
            "draft_seconds": {k: round(self.draft_cost(k), 6) for k in sizes if k <= 9} if self.draft.known else {},
            "catch_up_seconds_per_token": round(self.catch_up, 6) if self.draft.known else None,
            "draft_steps": self.draft_steps,
            "plain_steps": self.plain_steps,
            "plain_steps_since_draft": self.plain_streak,
        }

    def observe_accept(self, accepted: bool, regime: str = "greedy") -> None:
        """A draft token was checked (its predecessors were accepted) in a sequence of sampling `regime`."""
        g = self.accept_decay
        hits, seen = self._accept.get(regime, (0.0, 0.0))
        self._accept[regime] = (g * hits + (1.0 if accepted else 0.0), g * seen + 1.0)

    def observe_verified(self, drafted: int, accepted: int, regime: str = "greedy") -> None:
        """A step's outcome: of `drafted` tokens the first `accepted` were accepted; the tokens after the first
        rejected one were not checked."""
        for i in range(min(accepted + 1, drafted)):
            self.observe_accept(i < accepted, regime)

    def long_run(self, regime: str = "greedy") -> tuple[float, float]:
        """(accepted, checked) decayed counts of draft tokens across this drafter's sequences of `regime`."""
        return self._accept.get(regime, (0.0, 0.0))

    def draft_cost(self, k: int) -> float:
        """Seconds to draft k tokens (0 for k = 0: no propose() call)."""
        return self.draft(k) if k > 0 else 0.0

    def verify_cost(self, batch_size: int) -> float:
        """Seconds to verify a batch of batch_size tokens in one decode."""
        return self.verify(batch_size)
