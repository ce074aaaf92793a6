"""Continuous batching (tandem.sched.scheduler) on the tiny fixtures: a request's output does not depend on the
other requests in its batch, with a draft model (a draft context per request, or one shared by all, drafting in
one decode per draft position), with n-gram drafting and without, greedy and seeded."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import pytest

from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import EngineError
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate, sequence
from tandem.spec.steps import Decode
from tandem.spec.ngram import NgramDrafter
from tandem.spec.sampling import SamplingParams
from tandem.sched.scheduler import Scheduler
from tandem.testing.tiny import build_tiny_model
from test_ngram import LOOPY

CELLS = 256
"""Positions each sequence holds."""
BATCHED = ContextParams(n_ctx=4 * CELLS, n_batch=128, n_threads=2, exact=True, n_seq_max=4, seq_cells=True)
SHARED = dataclasses.replace(BATCHED, shared_cells=True)
"""The same cells as one pool: any sequence may hold all of them (llama-server's --kv-unified)."""
ALONE = ContextParams(n_ctx=CELLS, n_batch=128, n_threads=2, exact=True, seq_cells=True)
DRAFT = ContextParams(n_ctx=CELLS, n_batch=128, n_threads=2)
SHARED_DRAFT = ContextParams(n_ctx=4 * CELLS, n_batch=128, n_threads=2, n_seq_max=4, seq_cells=True)
"""One draft context for every sequence, as the Runtime makes at --parallel 4."""
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


def _drafter(kind: str, draft_model: Model, seq: int = 0, shared: Context | None = None):
    """kind "model": a draft context of its own; "shared": sequence `seq` of the shared draft context."""
    if kind == "shared":
        return ModelDrafter(shared, seq_id=seq)
    if kind == "model":
        return ModelDrafter(Context(draft_model, DRAFT))
    return NgramDrafter() if kind == "ngram" else None


def _params(max_tokens: int, seeded: bool | str) -> GenParams:
    """Greedy (False), seeded sample-and-compare (True), or seeded rejection sampling ("rejection")."""
    sampling = SamplingParams(temperature=0.8, seed=7) if seeded else SamplingParams()
    return GenParams(max_tokens=max_tokens, sampling=sampling, draft_max=4, draft_policy="fixed",
                     seed_matches_plain=seeded != "rejection")


def _kinds(kind: str | list[str]) -> list[str]:
    return [kind] * len(REQUESTS) if isinstance(kind, str) else kind


def _alone(models, kind: str | list[str], seeded: bool | str) -> list[list[int]]:
    """Each request's tokens, generated alone (a "shared" draft drafts in a one-sequence context)."""
    out = []
    for (text, n), k in zip(REQUESTS, _kinds(kind)):
        main_model = _main_model(models, k)
        ctx = Context(main_model, ALONE)
        drafter = _drafter("model" if k == "shared" else k, models["draft"])
        events = list(generate(ctx, main_model.tokenize(text), _params(n, seeded), drafter))
        out.append([e.id for e in events if isinstance(e, Token)])
    return out


def _batched(models, kind: str | list[str], seeded: bool | str, abort: tuple[int, int] | None = None,
             shared: Context | None = None, errors: bool = False,
             on_sched: Callable[[Scheduler], None] | None = None, params: ContextParams = BATCHED):
    """Token ids per request, the Done (or error) per request, and the scheduler (requests arrive at STARTS;
    `abort`: (request, step) to abort one; `shared`: the draft context of kind "shared", made when None;
    `errors`: whether a request may end with an error; `on_sched`: called with the scheduler)."""
    kinds = _kinds(kind)
    main_model, draft_model = _main_model(models, kinds[0]), models["draft"]
    main = Context(main_model, params)
    shared = shared if shared is not None else Context(draft_model, SHARED_DRAFT)
    sched = Scheduler(main)
    if on_sched is not None:
        on_sched(sched)
    ids: dict[str, list[int]] = {str(i): [] for i in range(len(REQUESTS))}
    done: dict[str, Done | Exception] = {}
    step = 0
    while len(done) < len(REQUESTS) - (abort is not None):
        for i, start in enumerate(STARTS):
            if start == step:
                text, n = REQUESTS[i]
                prompt = main_model.tokenize(text)
                sched.add(str(i), prompt, lambda s, p=prompt, n=n, k=kinds[i]: sequence(
                    main, p, _params(n, seeded), _drafter(k, draft_model, s, shared), seq_id=s,
                    room=sched.room_for(s)))
        if abort is not None and step == abort[1]:
            sched.abort(str(abort[0]))
        for rid, events in sched.step().items():
            for ev in events:
                assert errors or not isinstance(ev, Exception), ev
                if isinstance(ev, Token):
                    ids[rid].append(ev.id)
                else:
                    done[rid] = ev
        step += 1
        assert step < 500
    return ids, done, sched


@pytest.mark.parametrize("pool", [BATCHED, SHARED], ids=["reserved", "shared"])
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", ["none", "model", "shared", "ngram"])
def test_each_request_gives_what_it_gives_alone_bit_for_bit(models, kind, seeded, pool):
    alone = _alone(models, kind, seeded)
    ids, done, sched = _batched(models, kind, seeded, params=pool)
    assert [ids[str(i)] for i in range(len(REQUESTS))] == alone
    for d in done.values():
        assert d.stats.identity_holds(), d.stats
    if kind in ("model", "shared") or (kind == "ngram" and not seeded):  # (sampled, the loopy model stops looping)
        assert sum(d.stats.drafted for d in done.values()) > 0
    # batched for real: far fewer steps than the requests' steps added up
    assert sched.steps < sum(d.stats.draft_steps + d.stats.plain_steps for d in done.values()) * 0.7
    assert sched.capacity == 4 and not sched.running


@pytest.mark.parametrize("kind", ["model", "shared"])
def test_aborting_one_request_leaves_the_others_unchanged(models, kind):
    alone = _alone(models, kind, False)
    ids, done, sched = _batched(models, kind, False, abort=(1, 5))
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


def _counting(ctx: Context, sched_steps: Callable[[], int]) -> list[tuple[int, list[int]]]:
    """Record (scheduler step, sequences) of each of ctx's decodes that asks for logits (a draft decode; not a
    prompt's catch-up)."""
    calls: list[tuple[int, list[int]]] = []
    decode_batch = ctx.decode_batch

    def counted(parts):
        if any(p.wanted() for p in parts):
            calls.append((sched_steps(), [p.seq_id for p in parts]))
        return decode_batch(parts)

    ctx.decode_batch = counted
    return calls


def test_the_scheduler_drafts_for_every_sequence_in_one_decode_per_draft_position(models):
    shared, box = Context(models["draft"], SHARED_DRAFT), []
    calls = _counting(shared, lambda: box[0].steps)
    ids, done, sched = _batched(models, "shared", False, shared=shared, on_sched=box.append)
    assert [ids[str(i)] for i in range(len(REQUESTS))] == _alone(models, "shared", False)
    for d in done.values():
        assert d.stats.identity_holds(), d.stats
    # at most draft_max (4) draft decodes in a step, however many sequences draft in it, several in one decode
    # (one more in the step after a prompt: the new sequence's catch-up on it comes first)
    per_step = Counter(step for step, _ in calls)
    assert max(per_step.values()) <= 4 + 1 and max(len(seqs) for _, seqs in calls) >= 3
    per_sequence = sum(len(seqs) for _, seqs in calls)  # what a draft context per sequence would decode
    assert len(calls) < 0.7 * per_sequence, (len(calls), per_sequence)
    assert per_sequence >= sum(d.stats.draft_steps for d in done.values())


def test_a_token_reaches_its_client_in_the_step_whose_decode_gave_it(models):
    """The first token comes out of the step that decodes the prompt (before the draft model reads the prompt: its
    quantized weights read a prompt slower than the main model's), and every later step's tokens out of that
    step: nobody waits for the next step's drafts and decode before seeing a verified token."""
    main, shared = Context(models["main"], BATCHED), Context(models["draft"], SHARED_DRAFT)
    sched = Scheduler(main)
    prompt = models["main"].tokenize(REQUESTS[1][0])
    calls = []
    sched.add("a", prompt, lambda s: sequence(main, prompt, _params(12, False), ModelDrafter(shared, seq_id=s),
                                              seq_id=s))
    decodes, draft_decodes = main.decode_calls, shared.decode_calls
    out = sched.step()
    assert main.decode_calls == decodes + 1  # the prompt's decode only
    assert shared.decode_calls == draft_decodes  # the draft catches up on the prompt after the first token
    assert [type(e) for e in out["a"]] == [Token]
    while sched.running:
        out = sched.step()
        calls.append(len(out.get("a", [])))
    assert all(n >= 1 for n in calls)  # every step's verification emitted at least one token


def test_a_rejection_sampled_request_gives_what_it_gives_alone(models):
    alone = _alone(models, "shared", "rejection")
    ids, done, _ = _batched(models, "shared", "rejection")
    assert [ids[str(i)] for i in range(len(REQUESTS))] == alone
    for d in done.values():
        assert d.stats.identity_holds(), d.stats
    assert sum(d.stats.drafted for d in done.values()) > 0 and sum(d.stats.rejected for d in done.values()) > 0


def test_a_failing_draft_decode_costs_its_sequences_drafts_not_their_output(models):
    """Drafts are optional: a draft decode that fails (a shared draft pool out of pages, say) makes its sequences'
    drafters start over, and every request still gives what it gives alone, to the end."""
    kinds = ["shared", "shared", "none", "model"]  # 0 and 1 draft together; 3 in a draft context of its own
    alone = _alone(models, kinds, False)
    shared = Context(models["draft"], SHARED_DRAFT)
    decode_batch, failed = shared.decode_batch, []

    def failing(parts):
        if len(parts) > 1 and not failed and any(p.pos0 > 20 for p in parts):
            failed.append([p.seq_id for p in parts])
            raise EngineError("injected draft failure", "none")
        return decode_batch(parts)

    shared.decode_batch = failing
    ids, done, sched = _batched(models, kinds, False, shared=shared)
    assert failed == [[0, 1]]
    assert [ids[str(i)] for i in range(4)] == alone and all(isinstance(d, Done) for d in done.values())
    assert all(done[r].stats.identity_holds() and done[r].stats.drafted > 0 for r in ("0", "1"))
    assert sched.capacity == 4 and not sched.running


def test_a_request_cancelled_while_it_drafts_stops_drafting_at_once_and_ends_in_that_step(models):
    """A client that leaves mid-draft (a draft of up to 8 tokens, one decode each): its sequence drafts no further
    decode after the cancel, verifies what it has, and ends "cancelled" in the same step, so the step does not hold
    up the other requests (and a new one's first token) with drafts nobody will read."""
    main_model = models["main"]
    main, shared = Context(main_model, BATCHED), Context(models["draft"], SHARED_DRAFT)
    prompt = main_model.tokenize(REQUESTS[1][0])
    gone, draft_decodes = [], []
    decode_batch = shared.decode_batch

    def counted(parts):
        draft_decodes.append(len(parts))
        if len(draft_decodes) == 3:
            gone.append(True)  # the client leaves while this decode runs
        return decode_batch(parts)

    shared.decode_batch = counted
    gp = dataclasses.replace(_params(40, False), draft_max=8)
    sched = Scheduler(main)
    sched.add("a", prompt, lambda s: sequence(main, prompt, gp, ModelDrafter(shared, seq_id=s), seq_id=s,
                                              cancel=lambda: bool(gone)))
    while sched.running and not gone:
        last = sched.step().get("a", [])
    assert len(draft_decodes) == 3  # not one draft decode after the one during which the client left
    assert isinstance(last[-1], Done) and last[-1].stats.stop_reason == "cancelled" and not sched.running
    assert last[-1].stats.identity_holds()


def test_closing_a_sequence_mid_draft_keeps_its_drafters_record_true(models):
    """A sequence closed while it waits for a draft decode's logits (the decode ran): the drafter forgets the
    cells that decode wrote, and the next request on that sequence gives what it gives alone."""
    main_model = models["main"]
    main, shared = Context(main_model, BATCHED), Context(models["draft"], SHARED_DRAFT)
    drafter = ModelDrafter(shared, seq_id=2)
    text, n = REQUESTS[2]
    steps = sequence(main, main_model.tokenize(text), _params(n, False), drafter, seq_id=2)
    ev, drafts = next(steps), 0
    while True:
        ctx = ev.ctx or main
        logits = ctx.decode(ev.rows.tokens, ev.rows.pos0, seq_id=ev.rows.seq_id, logits=ev.rows.logits)
        drafts += ev.ctx is shared
        if drafts == 6:  # the second step's second draft decode: its cells are written, its logits not sent
            break
        ev = steps.send(logits)
        while not isinstance(ev, Decode):
            ev = next(steps)
    assert len(shared.held(2)) > len(drafter._kv)
    steps.close()
    assert shared.held(2) == drafter._kv
    again = list(generate(Context(main_model, ALONE), main_model.tokenize(text), _params(n, False), drafter))
    alone = list(generate(Context(main_model, ALONE), main_model.tokenize(text), _params(n, False),
                          _drafter("model", models["draft"])))
    assert [e.id for e in again if isinstance(e, Token)] == [e.id for e in alone if isinstance(e, Token)]
    # the draft's logits are the same too: it drafts and is accepted as alone
    assert (again[-1].stats.drafted, again[-1].stats.accepted) == (alone[-1].stats.drafted, alone[-1].stats.accepted)


def _run(sched: Scheduler, main: Context, prompt: list[int], n: int, rid: str,
         drafter: Callable[[int], object] = lambda s: None) -> int | None:
    """Add a greedy request as the server does (room and room if relocated); `drafter(seq_id)`: its drafter."""
    return sched.add(rid, prompt, lambda s: sequence(main, prompt, _params(n, False), drafter(s), seq_id=s,
                                                     room=sched.room_for(s),
                                                     room_relocated=sched.room_relocated_for(s)))


def _drain(sched: Scheduler, out: dict[str, list]) -> None:
    while sched.running:
        for rid, events in sched.step().items():
            out.setdefault(rid, []).extend(events)


def _ids(events: list) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def _alone_in(model: Model, prompt: list[int], n: int) -> list[int]:
    return _ids(list(generate(Context(model, ALONE), prompt, _params(n, False))))


def test_in_a_shared_pool_one_request_may_hold_more_than_its_share_and_a_prompt_waits_for_cells(models):
    """4 pages of 64 cells for 4 sequences: one request grows past 64 positions (a reserved share), a prompt that
    needs the pages it holds waits until it ends, and each output is what it is alone."""
    model = models["main"]
    main = Context(model, dataclasses.replace(SHARED, n_ctx=256))
    assert main.shared and main.capacity == 256
    sched = Scheduler(main)
    long_prompt = model.tokenize("Once upon a time, " * 6)[:40]
    other = model.tokenize("The capital of France is a city of " * 8)[:120]
    assert _run(sched, main, long_prompt, 120, "long") is not None
    out: dict[str, list] = {}
    while main.held_length(0) < 140:  # the first request now holds 3 pages: 1 is left
        for rid, events in sched.step().items():
            out.setdefault(rid, []).extend(events)
    assert _run(sched, main, other, 20, "waits") is None and list(sched.running) == ["long"]
    _drain(sched, out)
    assert out["long"][-1].stats.stop_reason == "length"
    assert _run(sched, main, other, 20, "other") is not None  # its cells are free now
    _drain(sched, out)
    assert _ids(out["long"]) == _alone_in(model, long_prompt, 120)
    assert _ids(out["other"]) == _alone_in(model, other, 20)
    assert sched.evicted == 1  # the idle first request's cached prefix made room


def test_in_a_shared_pool_a_request_that_finds_no_room_ends_as_at_its_contexts_end_and_spares_the_others(models):
    model = models["main"]
    main = Context(model, dataclasses.replace(SHARED, n_ctx=256))
    sched = Scheduler(main)
    a, b = model.tokenize("Once upon a time, " * 6)[:60], model.tokenize("def fizzbuzz(n): " * 6)[:60]
    _run(sched, main, a, 150, "a")
    _run(sched, main, b, 150, "b")
    out: dict[str, list] = {}
    _drain(sched, out)
    reasons = sorted(out[r][-1].stats.stop_reason for r in ("a", "b"))
    assert reasons == ["context", "context"] or reasons == ["context", "length"], reasons
    for rid, prompt in (("a", a), ("b", b)):  # each a prefix of what it writes alone: cut short, not corrupted
        got = _ids(out[rid])
        assert got == _alone_in(model, prompt, 150)[:len(got)] and len(got) > 0
    assert sum(len(_ids(out[r])) + 60 for r in ("a", "b")) <= 256 + 2 * 64  # no more than the pool's pages


@pytest.mark.parametrize("kind", ["none", "shared"])
def test_in_a_shared_pool_a_request_with_free_pages_only_below_its_last_relocates_and_gives_what_it_gives_alone(
        models, kind):
    """4 pages: a short request takes page 0 and ends, a long one takes pages 1-3; when the long one needs a fourth,
    page 0 (the short one's, dropped) is free but below its last page. It relocates (drops its cells, decodes its
    192 positions again into pages 0-2, its drafter starts over) and ends as it does alone, not with "context"."""
    model = models["main"]
    main, shared = Context(model, dataclasses.replace(SHARED, n_ctx=256)), Context(models["draft"], SHARED_DRAFT)
    sched = Scheduler(main)
    short, long = model.tokenize("Once upon a time, " * 6)[:60], model.tokenize("def fizzbuzz(n): " * 6)[:60]
    _run(sched, main, short, 10, "short")
    _run(sched, main, long, 150, "long", lambda s: _drafter(kind, models["draft"], s, shared))
    out: dict[str, list] = {}
    _drain(sched, out)
    stats = out["long"][-1].stats
    alone = _alone_in(model, long, 150)
    assert len(alone) == 150 and _ids(out["long"]) == alone  # alone it ends with "length"
    assert stats.stop_reason == "length" and stats.relocations == 1, stats
    assert out["short"][-1].stats.relocations == 0 and sched.evicted == 1
    if kind == "shared":
        assert stats.drafted > 0 and stats.identity_holds(), stats


def test_in_a_shared_pool_a_next_turn_whose_cached_prefix_sits_too_high_starts_cold_in_the_lowest_pages(models):
    """4 pages: one conversation's cache holds pages 0-1, another's pages 2-3. The second's next turn needs a third
    page after its own, and none is left above them: its cached prefix is dropped and its prompt decoded cold into
    the lowest pages (the first conversation's, dropped as least recently used), not failed for a full cache."""
    model = models["main"]
    main = Context(model, dataclasses.replace(SHARED, n_ctx=256))
    sched = Scheduler(main)
    first, second = model.tokenize("Once upon a time, " * 6)[:60], model.tokenize("def fizzbuzz(n): " * 6)[:60]
    out: dict[str, list] = {}
    for rid, prompt, n in (("first", first, 40), ("second", second, 60)):
        _run(sched, main, prompt, n, rid)
        _drain(sched, out)
    turn = [*second, *_ids(out["second"]), *model.tokenize(" and then the next question, " * 8)[:70]]
    assert len(turn) > 3 * 64 - 64 and _run(sched, main, turn, 20, "turn") is not None
    _drain(sched, out)
    assert isinstance(out["turn"][-1], Done), out["turn"][-1]
    assert _ids(out["turn"]) == _alone_in(model, turn, 20) and out["turn"][-1].stats.cached_tokens == 0


def test_in_a_shared_pool_a_request_that_cannot_fit_even_relocated_ends_as_at_its_contexts_end(models):
    """Two long requests share the 4 pages: the first with no page after its last cannot relocate either (the other
    holds the rest of the pool) and ends with "context"; the other then relocates into its pages and ends as it
    does alone. A request longer than the whole pool relocates, then ends with "context" where it does alone."""
    model = models["main"]
    a, b = model.tokenize("Once upon a time, " * 6)[:60], model.tokenize("def fizzbuzz(n): " * 6)[:60]
    for n_a, n_b in ((150, 150), (10, 250)):
        main = Context(model, dataclasses.replace(SHARED, n_ctx=256))
        sched = Scheduler(main)
        _run(sched, main, a, n_a, "a")
        _run(sched, main, b, n_b, "b")
        out: dict[str, list] = {}
        _drain(sched, out)
        alone_a, alone_b = _alone_in(model, a, n_a), _alone_in(model, b, n_b)
        done_a, done_b = out["a"][-1].stats, out["b"][-1].stats
        assert (done_a.stop_reason, done_a.relocations) == ("length", n_a // 150), done_a
        assert _ids(out["a"]) == alone_a
        assert done_b.stop_reason == "context" and done_b.relocations == n_b // 250, done_b
        got = _ids(out["b"])
        assert got == alone_b[:len(got)] and (n_b == 150 or got == alone_b)  # cut short where it cannot fit
        assert main.held_length(0) + main.held_length(1) <= 256


def test_a_long_prompts_catch_up_is_read_a_chunk_a_step_while_others_decode(models, monkeypatch):
    """Another sequence is decoding when a request with a long prompt arrives: its draft reads that prompt in
    chunks of about a step's cost (CATCH_UP_MIN here, where nothing is measured), one per step, instead of one
    decode that would stall the other sequence for the whole prompt; the output stays what it is alone."""
    from tandem.spec.generate import CATCH_UP_MIN
    main_model, draft_model = models["main"], models["draft"]
    main = Context(main_model, BATCHED)
    shared = Context(draft_model, SHARED_DRAFT)
    sched = Scheduler(main)
    rows: list[tuple[int, int]] = []  # (sequences running, rows of the long prompt's draft decodes) per draft decode
    decode = Scheduler._decode

    def spy(self, ctx, seqs):
        if ctx is shared:
            rows.extend((len(self.running), len(s.pending.rows.tokens)) for s in seqs if s.request_id == "long")
        return decode(self, ctx, seqs)
    monkeypatch.setattr(Scheduler, "_decode", spy)
    long_text = " ".join(f"item {i}," for i in range(36))
    requests = {"short": ("Once upon a time", 80), "long": (long_text, 24)}
    gp = lambda n: GenParams(max_tokens=n, draft_max=4, draft_policy="fixed")  # noqa: E731 - always drafts
    out: dict[str, list[int]] = {r: [] for r in requests}

    def step() -> None:
        for rid, events in sched.step().items():
            out[rid].extend(e.id for e in events if isinstance(e, Token))
    for rid, (text, n) in requests.items():
        prompt = main_model.tokenize(text)
        assert sched.add(rid, prompt, lambda s, p=prompt, n=n: sequence(
            main, p, gp(n), ModelDrafter(shared, seq_id=s), seq_id=s, room=sched.room_for(s),
            load=lambda: len(sched.running))) is not None
        step()
    while sched.running:
        step()
    prompt = main_model.tokenize(long_text)
    assert len(prompt) > 4 * CATCH_UP_MIN
    shared_rows = [n for running, n in rows if running > 1]
    assert shared_rows and max(shared_rows) <= CATCH_UP_MIN + 1  # a chunk (or a draft's own rows) a step
    alone = [e.id for e in generate(Context(main_model, ALONE), prompt, gp(24),
                                    ModelDrafter(Context(draft_model, DRAFT))) if isinstance(e, Token)]
    assert out["long"] == alone
