"""Continuous batching (tandem.sched.scheduler) on the tiny fixtures: a request's output does not depend on the
other requests in its batch, with a draft model, with n-gram drafting and without, greedy and seeded."""

from __future__ import annotations

import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate, sequence
from tandem.spec.ngram import NgramDrafter
from tandem.spec.sampling import SamplingParams
from tandem.sched.scheduler import Scheduler
from tandem.testing.tiny import build_tiny_model
from test_ngram import LOOPY

CELLS = 256
"""Positions each sequence holds."""
BATCHED = ContextParams(n_ctx=4 * CELLS, n_batch=128, n_threads=2, exact=True, n_seq_max=4, seq_cells=True)
ALONE = ContextParams(n_ctx=CELLS, n_batch=128, n_threads=2, exact=True, seq_cells=True)
DRAFT = ContextParams(n_ctx=CELLS, n_batch=128, n_threads=2)
REQUESTS = [("The capital of France is", 14), ("def fizzbuzz(n):\n    for i in range(n):", 40),
            ("Once upon a time, in a kingdom by the sea, there lived a", 25), ("1, 2, 3, 4, 5,", 33)]
STARTS = [0, 0, 3, 6]
"""The step at which each request arrives."""


@pytest.fixture(scope="module")
def models(tiny):
    loopy = tiny["main"].parent / f"{LOOPY.name}-{LOOPY.digest()}.gguf"
    if not loopy.is_file():
        build_tiny_model(loopy, LOOPY)
    return {"main": Model(tiny["main_f16"], repack=False), "draft": Model(tiny["draft_close"]),
            "loopy": Model(loopy, repack=False)}


def _main_model(models, kind: str) -> Model:
    """The standard fixtures never repeat themselves: n-gram drafting needs the loopy one."""
    return models["loopy" if kind == "ngram" else "main"]


def _drafter(kind: str, draft_model: Model):
    if kind == "model":
        return ModelDrafter(Context(draft_model, DRAFT))
    return NgramDrafter() if kind == "ngram" else None


def _params(max_tokens: int, seeded: bool) -> GenParams:
    sampling = SamplingParams(temperature=0.8, seed=7) if seeded else SamplingParams()
    return GenParams(max_tokens=max_tokens, sampling=sampling, draft_max=4, draft_policy="fixed")


def _alone(models, kind: str, seeded: bool) -> list[list[int]]:
    main_model, draft_model = _main_model(models, kind), models["draft"]
    out = []
    for text, n in REQUESTS:
        ctx = Context(main_model, ALONE)
        events = list(generate(ctx, main_model.tokenize(text), _params(n, seeded), _drafter(kind, draft_model)))
        out.append([e.id for e in events if isinstance(e, Token)])
    return out


def _batched(models, kind: str, seeded: bool, abort: tuple[int, int] | None = None):
    """Token ids per request, the Done stats per request, and the scheduler (requests arrive at STARTS; `abort`:
    (request, step) to abort one)."""
    main_model, draft_model = _main_model(models, kind), models["draft"]
    main = Context(main_model, BATCHED)
    sched = Scheduler(main)
    ids: dict[str, list[int]] = {str(i): [] for i in range(len(REQUESTS))}
    done: dict[str, Done] = {}
    step = 0
    while len(done) < len(REQUESTS) - (abort is not None):
        for i, start in enumerate(STARTS):
            if start == step:
                text, n = REQUESTS[i]
                prompt = main_model.tokenize(text)
                drafter = _drafter(kind, draft_model)
                sched.add(str(i), prompt, lambda s, p=prompt, n=n, d=drafter: sequence(main, p, _params(n, seeded), d,
                                                                                       seq_id=s))
        if abort is not None and step == abort[1]:
            sched.abort(str(abort[0]))
        for rid, events in sched.step().items():
            for ev in events:
                assert not isinstance(ev, Exception), ev
                if isinstance(ev, Token):
                    ids[rid].append(ev.id)
                else:
                    done[rid] = ev
        step += 1
        assert step < 500
    return ids, done, sched


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", ["none", "model", "ngram"])
def test_each_request_gives_what_it_gives_alone_bit_for_bit(models, kind, seeded):
    alone = _alone(models, kind, seeded)
    ids, done, sched = _batched(models, kind, seeded)
    assert [ids[str(i)] for i in range(len(REQUESTS))] == alone
    for d in done.values():
        assert d.stats.identity_holds(), d.stats
    if kind == "model" or (kind == "ngram" and not seeded):  # (sampled, the loopy model stops looping)
        assert sum(d.stats.drafted for d in done.values()) > 0
    # batched for real: far fewer steps than the requests' steps added up
    assert sched.steps < sum(d.stats.draft_steps + d.stats.plain_steps for d in done.values()) * 0.7
    assert sched.capacity == 4 and not sched.running


def test_aborting_one_request_leaves_the_others_unchanged(models):
    alone = _alone(models, "model", False)
    ids, done, sched = _batched(models, "model", False, abort=(1, 5))
    assert sorted(done) == ["0", "2", "3"]
    assert [ids[r] for r in ("0", "2", "3")] == [alone[0], alone[2], alone[3]]
    assert len(ids["1"]) < len(alone[1]) and ids["1"] == alone[1][:len(ids["1"])]  # cut short, not corrupted
    assert sched.capacity == 4


def test_a_request_that_fails_ends_alone_and_a_new_one_reuses_a_freed_sequences_prefix(models):
    main_model = models["main"]
    main = Context(main_model, BATCHED)
    sched = Scheduler(main)
    first = main_model.tokenize("User: hello\nAssistant:")
    sched.add("a", first, lambda s: sequence(main, first, _params(6, False), seq_id=s))
    sched.add("bad", [], lambda s: sequence(main, [], _params(6, False), seq_id=s))
    out: dict[str, list] = {}
    while sched.running:
        for rid, events in sched.step().items():
            out.setdefault(rid, []).extend(events)
    assert isinstance(out["bad"][-1], Exception) and "the prompt is empty" in str(out["bad"][-1])
    assert isinstance(out["a"][-1], Done)
    answer = [e.id for e in out["a"] if isinstance(e, Token)]
    turn2 = [*first, *answer, *main_model.tokenize(" and then?", add_special=False)]
    seq_id = sched.add("b", turn2, lambda s: sequence(main, turn2, _params(6, False), seq_id=s))
    while sched.running:
        for rid, events in sched.step().items():
            out.setdefault(rid, []).extend(events)
    assert seq_id == 0 and out["b"][-1].stats.cached_tokens >= len(first)  # the first turn's sequence, reused
