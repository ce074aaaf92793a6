"""Logits processors under speculation: every verified row and every drafted row sees its own history."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.ngram import NgramDrafter
from tandem.spec.processors import Processors

PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=2)
PROMPTS = ["The capital of France is", "def fizzbuzz(n):", "Once upon a time", "1, 2, 3, 4,"]


class NoRepeat:
    """Refuses any token already generated, and the top token after an even-length history (a history-dependent
    mask, as a grammar's or a penalty's is, that surely changes the output)."""

    def __init__(self, n_prompt: int):
        self.n_prompt = n_prompt
        self.seen: list[list[int]] = []

    def __call__(self, history, logits):
        self.seen.append(list(history))
        logits[list(set(history[self.n_prompt:]))] = -np.inf
        if len(history) % 2 == 0:
            logits[logits.argmax()] = -np.inf
        return logits


def _run(main, prompt, gp, drafter=None):
    events = list(generate(main, prompt, gp, drafter))
    assert isinstance(events[-1], Done) and events[-1].stats.identity_holds()
    return [e.id for e in events if isinstance(e, Token)], events[-1].stats


def test_rows_stop_after_the_first_refused_draft():
    """Rows past a refused draft token are never read by verify(), so they are not processed either."""
    proc = NoRepeat(0)
    rows = np.zeros((4, 8), dtype=np.float32)
    Processors((proc,)).rows([1], [2, 2, 3], rows)  # the second 2 repeats the first draft token
    assert proc.seen == [[1], [1, 2]]
    assert rows[1, 2] == -np.inf and np.isfinite(rows[2]).all()


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_speculative_greedy_equals_plain_greedy_under_a_processor(tiny, draft):
    main = Context(Model(tiny["main"]), PARAMS)
    drafted = 0
    for text in PROMPTS:
        prompt = main.model.tokenize(text)

        def gp():  # a fresh processor per generation
            return GenParams(max_tokens=40, draft_max=5, processors=Processors((NoRepeat(len(prompt)),)))

        plain, _ = _run(main, prompt, gp())
        drafter = ModelDrafter(Context(Model(tiny["draft_same"]), PARAMS)) if draft == "model" else NgramDrafter()
        spec, stats = _run(main, prompt, gp(), drafter)
        assert spec == plain, text
        assert len(set(plain)) == len(plain)  # the processor was applied: no token twice
        unprocessed, _ = _run(main, prompt, GenParams(max_tokens=40))
        assert unprocessed[1:] != plain[1:]  # and it changed the output
        drafted += stats.accepted
        if draft == "model":
            assert stats.acceptance_rate == 1.0  # the draft (equal to main) samples from processed rows too
    assert drafted > 0 or draft == "ngram"
