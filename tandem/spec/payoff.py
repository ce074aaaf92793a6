"""Can a draft make the main model faster at all? The best case, from costs measured at load.

In exact mode a plain step decodes two rows, and the fastest plain decoding (what `--draft none` does)
decodes one. A draft pays only if drafting k tokens and verifying k + 1 beats that, and no acceptance
does better than 1. So if even full acceptance loses, the pair is slower than plain decoding whatever
the text (Q8_0 main + Q4_1 draft on 2 cores: 0.64x, docs/benchmarks.md section 6), and the user should
hear it at load rather than find it in the stats.
"""

from __future__ import annotations

from collections.abc import Mapping

PAUSE_BELOW = 1.3
"""By default a draft whose best case (every token accepted, the best length) is below this many times plain
decoding's tokens/s is paused. Acceptance is never full: at the 0.88 greedy agreement of Qwen2.5-Coder-0.5B with
its 1.5B main, the best length gives about 0.9 of the best case, and the policy wants its 1.1 margin on top. That
pair's best case is 1.1-1.2x here, and by default it ran at 0.89-1.10x of `--draft none` across the bench prompts
(0.84-0.96x at a 1.06x best case), while the default pair's F32 main (1.5-1.9x) gains 1.4x."""


def best_case_speedup(verify: Mapping[int, float], draft_token: float, plain_token: float,
                      draft_max: int) -> tuple[float, int]:
    """(tokens/s ratio over plain decoding, draft length k) of the best k if every draft token were accepted.

    `verify[n]`: seconds of a verification decode of n tokens (measured sizes); `draft_token`: seconds the
    draft spends per drafted token; `plain_token`: seconds of one plain (lone-row) decode. Only measured
    sizes n = k + 1 with 1 <= k <= draft_max are considered. (0.0, 0) when none is.
    """
    best, best_k = 0.0, 0
    for n, seconds in sorted(verify.items()):
        k = n - 1
        if 1 <= k <= draft_max:
            ratio = n / (k * draft_token + seconds) * plain_token
            if ratio > best:
                best, best_k = ratio, k
    return best, best_k
