"""The memory plan (tandem.models.fit): its arithmetic, and against what llama.cpp really allocates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tandem.config import ModelOptions, SpecOptions
from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import BadInputError, DoesNotFitError, LoadFailedError, ModelNotFoundError, NotGGUFError
from tandem.models.fit import (MIB, PROCESS_BASELINE, Memory, context_params, make_plan, parse_size, plan_for,
                               plan_model, tolerance)
from tandem.models.gguf_header import read_header
from tandem.runtime import Runtime

GIB = 1 << 30
PLENTY = Memory(64 * GIB, "--memory-limit", 64 * GIB)


def opts(tiny: dict[str, Path], draft: str | None = "draft_small", **kw) -> ModelOptions:
    return ModelOptions(model=str(tiny["main"]), draft=str(tiny[draft]) if draft else "none", threads=1, **kw)


def plan(tiny, draft="draft_small", memory=PLENTY, **kw):
    o = opts(tiny, draft, **kw)
    return make_plan(o, read_header(tiny["main"]), read_header(tiny[draft]) if draft else None, memory)


# -- GGUF headers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["main", "draft_small", "main_f16"])
def test_header_agrees_with_llama_cpp(tiny, name):
    h = read_header(tiny[name])
    m = Model(tiny[name])
    assert h.weights_bytes == m.size_bytes
    assert h.n_vocab == m.n_vocab
    assert h.arch == "llama" and h.n_layer == (1 if name == "draft_small" else 2) and h.n_embd == 64


def test_header_refuses_missing_non_gguf_and_truncated_files(tiny, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_header(tmp_path / "nope.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(NotGGUFError, match="not a GGUF model"):
        read_header(tmp_path / "text.gguf")
    data = tiny["draft_small"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(NotGGUFError, match="truncated") as e:
        read_header(tmp_path / "cut.gguf")
    assert "again" in e.value.fix


# -- arithmetic ---------------------------------------------------------------------------------------------------
def test_small_contexts_are_padded_to_256_cells_and_batch_to_the_context(tiny):
    p = plan(tiny, None, ctx_size=32)
    assert p.main.n_cells == 256 and p.main.params.n_ctx == 32 and p.main.params.n_batch == 32
    assert plan(tiny, None, ctx_size=257).main.n_cells == 512
    big = plan(tiny, None, ctx_size=4096).main
    assert big.params.n_batch == 512
    # 2 layers x 4 KV heads x 16 dims x (K + V) x 2 bytes per cell (f16, the main's default)
    assert big.kv == 4096 * 2 * 64 * 2 * 2


def test_quantized_k_saves_and_quantized_v_is_refused(tiny):
    f16 = plan(tiny, ctx_size=4096).draft
    q8 = plan(tiny, ctx_size=4096, cache_type_k_draft="q8_0").draft
    assert q8.kv == 4096 * 1 * (64 // 32 * 34 + 64 * 2)  # one layer: q8_0 K row + f16 V row
    assert q8.kv < f16.kv
    with pytest.raises(BadInputError, match="flash attention") as e:
        plan(tiny, cache_type_v_draft="q8_0")
    assert "--cache-type-k-draft q8_0" in e.value.fix
    with pytest.raises(BadInputError, match="not a KV cache type"):
        plan(tiny, cache_type_k="q3_x")


def test_draft_context_larger_than_main_is_refused():
    with pytest.raises(BadInputError, match="--ctx-size-draft 1024 is larger than --ctx-size 512"):
        context_params(ModelOptions(ctx_size=512, ctx_size_draft=1024), draft=True)
    assert context_params(ModelOptions(ctx_size=512, ctx_size_draft=64), draft=True).n_ctx == 64


@pytest.mark.parametrize(("text", "value"), [("1048576", 1 << 20), ("512M", 512 << 20), ("2G", 2 << 30),
                                             ("1.5GiB", 3 << 29), ("64k", 64 << 10), (None, None)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1G", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(BadInputError, match="--memory-limit"):
        parse_size(text)


def test_smaller_draft_context_saves_memory_and_the_plan_says_how_much(tiny):
    full = plan(tiny, ctx_size=8192)
    small = plan(tiny, ctx_size=8192, ctx_size_draft=1024)
    assert small.draft.total < full.draft.total and small.main == full.main
    by_ctx = {s.n_ctx: s for s in small.savings}
    assert by_ctx[8192].saved == 0 and by_ctx[1024].saved == full.draft.total - small.draft.total
    assert [s.n_ctx for s in full.savings] == [8192, 4096, 2048, 1024, 512, 256]


def test_largest_contexts_that_fit_are_the_boundary(tiny):
    need = plan(tiny, ctx_size=16384).total
    mem = Memory(need - 64 * MIB, "--memory-limit", 64 * GIB)
    p = plan(tiny, memory=mem, ctx_size=16384)
    assert not p.fits and p.max_ctx is not None and p.max_ctx % 256 == 0
    assert plan(tiny, memory=mem, ctx_size=p.max_ctx).fits
    assert not plan(tiny, memory=mem, ctx_size=p.max_ctx + 256).fits
    assert plan(tiny, memory=mem, ctx_size=16384, ctx_size_draft=p.max_ctx_draft).fits
    assert not plan(tiny, memory=mem, ctx_size=16384, ctx_size_draft=p.max_ctx_draft + 256).fits


def test_a_draft_that_does_not_fit_names_the_draft_and_concrete_fixes(tiny):
    p0 = plan(tiny, ctx_size=16384)
    mem = Memory(p0.total - MIB // 2, "--memory-limit", 64 * GIB)
    p = plan(tiny, memory=mem, ctx_size=16384)
    err = p.error()
    assert isinstance(err, DoesNotFitError) and err.http_status == 507 and err.param == "draft_model"
    assert f"draft {tiny['draft_small'].stem} needs" in err.cause and "free after the main model" in err.cause
    assert f"--ctx-size-draft {p.max_ctx_draft}" in err.fix
    assert "--cache-type-k-draft q8_0" in err.fix  # q8_0 K saves 0.94 MiB here, more than the 0.5 MiB missing
    assert plan(tiny, memory=mem, ctx_size=16384, cache_type_k_draft="q8_0").fits
    assert "--draft none" in err.fix and "--draft-optional" in err.fix


def test_a_main_model_that_does_not_fit_at_any_context(tiny):
    mem = Memory(8 * MIB, "--memory-limit", 64 * GIB)  # less than the tiny main's weights
    p = plan(tiny, None, memory=mem)
    assert not p.fits and p.max_ctx is None
    assert "main" in p.verdict() and "smaller or more quantized main model" in p.error().fix


def test_plan_for_refuses_or_drops_the_draft(tiny, tmp_path):
    o = opts(tiny, ctx_size=4096)
    main, draft = tiny["main"], tiny["draft_small"]
    p = make_plan(o, read_header(main), read_header(draft), PLENTY)
    tight = Memory(p.process + p.main.total + p.draft.total // 2, "--memory-limit", 64 * GIB)
    with pytest.raises(DoesNotFitError):
        plan_for(o, main, draft, memory=tight)
    dropped = plan_for(dataclasses.replace(o, draft_optional=True), main, draft, memory=tight)
    assert dropped.draft is None and dropped.fits and "does not fit" in dropped.draft_status
    with pytest.raises(ModelNotFoundError):
        plan_for(o, main, tmp_path / "missing.gguf")
    missing = plan_for(dataclasses.replace(o, draft_optional=True), main, tmp_path / "missing.gguf")
    assert missing.draft is None and "does not exist" in missing.draft_status
    with pytest.raises(DoesNotFitError):  # the main model is never optional
        plan_for(dataclasses.replace(o, draft_optional=True), main, draft,
                 memory=Memory(p.process + p.main.total - MIB, "--memory-limit", 64 * GIB))


# -- against llama.cpp --------------------------------------------------------------------------------------------
CASES = {
    "main alone, ctx 256": dict(draft=None, ctx_size=256),
    "main alone, ctx 4096": dict(draft=None, ctx_size=4096),
    "main + draft, ctx 256": dict(draft="draft_close", ctx_size=256),
    "main + draft, ctx 4096": dict(draft="draft_close", ctx_size=4096),
    "main + draft, q8_0 draft K, draft ctx 1024": dict(draft="draft_small", ctx_size=4096, ctx_size_draft=1024,
                                                         cache_type_k_draft="q8_0"),
    "main ctx 32 (padded)": dict(draft="draft_small", ctx_size=32),
    "main + draft, 4 sequences in one pool of 4096": dict(draft="draft_close", ctx_size=4096, parallel=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_what_llama_cpp_allocates(tiny, case):
    kw = dict(CASES[case])
    o = opts(tiny, kw.pop("draft"), **kw)
    rt = Runtime(o, spec=SpecOptions(draft_max=8), announce=lambda _s: None)
    assert rt.main.params is rt.plan.main.params  # one source of truth: the plan's parameters reach llama.cpp
    assert len(rt.checks) == (2 if rt.plan.draft else 1)
    for check, ctx in zip(rt.checks, [rt.main] + ([rt.drafter.ctx] if rt.drafter else []), strict=True):
        p = check.plan
        assert ctx.n_ctx == p.n_cells
        assert set(check.measured) == {"weights", "kv", "compute", "output"}, check.measured
        # each buffer within 1% or 64 KiB (llama.cpp reports MiB with two decimals): far tighter than required
        for name, want, got in check.rows()[:4]:
            assert abs(got - want) <= max(want // 100, 64 << 10), f"{case}: {name} {check.describe()}"
        assert check.within_tolerance, check.describe()  # 5% or 32 MiB, RSS growth included
        assert check.rss_delta is not None and check.rss_delta > 0


def test_tolerance_is_5_percent_or_32_mib():
    assert tolerance(10 * MIB) == 32 * MIB
    assert tolerance(2 * GIB) == 2 * GIB // 20


def test_a_model_file_error_says_whether_it_is_about_the_main_or_the_draft(tiny, tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_bytes(b"these are notes, not a model")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny["main"].read_bytes()[:4096])  # a GGUF header, then nothing: llama.cpp fails
    cases = [(ModelOptions(model=str(tiny["main"]), draft=str(notes)), NotGGUFError, "draft model: ", notes),
             (ModelOptions(model=str(notes), draft=str(tiny["draft_close"])), NotGGUFError, "main model: ", notes),
             (ModelOptions(model=str(tiny["main"]), draft=str(tmp_path / "gone.gguf")), ModelNotFoundError,
              "draft model: ", tmp_path / "gone.gguf")]
    for opts, kind, role, path in cases:
        with pytest.raises(kind) as e:
            Runtime(dataclasses.replace(opts, ctx_size=256), announce=lambda _s: None)
        assert e.value.message.startswith(role) and str(path) in e.value.message and e.value.fix
    for opts, role in ((ModelOptions(model=str(tiny["main"]), draft=str(broken)), "draft model: "),
                       (ModelOptions(model=str(broken), draft="none"), "main model: ")):
        try:
            Runtime(dataclasses.replace(opts, ctx_size=256), announce=lambda _s: None)
        except (LoadFailedError, BadInputError) as err:  # llama.cpp's refusal, or the header reader's
            assert err.message.startswith(role) and str(broken) in err.message, err.message
        else:
            raise AssertionError(f"{opts} loaded")


def test_sequences_share_one_kv_buffer_in_the_plan_as_in_llama_cpp(tiny):
    model = Model(tiny["main"])
    header = read_header(tiny["main"])
    for seqs in (1, 4):
        params = ContextParams(n_ctx=1024, n_batch=128, n_threads=1, n_seq_max=seqs, seq_cells=seqs > 1)
        ctx = Context(model, params)
        plan = plan_model(header, params, role="main")
        assert plan.kv == ctx.buffers["kv"]  # n_ctx cells in all, not per sequence
        assert abs(plan.output - ctx.buffers["output"]) <= 64 << 10


def test_parallel_requests_share_the_context_and_too_small_a_share_is_refused(tiny):
    o = ModelOptions(model=str(tiny["main"]), draft=str(tiny["draft_close"]), ctx_size=1024, parallel=4)
    plan = plan_for(o, tiny["main"], tiny["draft_close"])  # the fit search tries small contexts: no refusal there
    assert plan.main.params.n_seq_max == 4 and plan.main.params.seq_cells and plan.main.params.shared_cells
    assert plan.draft.params.n_ctx == 1024 and plan.draft.params.n_seq_max == 4  # one draft context for all
    assert plan.draft.params.seq_cells and plan.draft.params.shared_cells and plan.draft.contexts == 1
    small = dataclasses.replace(o, ctx_size=512, parallel=8)
    assert plan_for(small, tiny["main"], tiny["draft_close"]).main.params.n_ctx == 512  # one pool: any share is fine
    with pytest.raises(BadInputError, match="fewer than 128 positions.*at least 1024"):
        plan_for(dataclasses.replace(small, kv_unified=False), tiny["main"], tiny["draft_close"])
    assert not plan_for(dataclasses.replace(o, kv_unified=False), tiny["main"], tiny["draft_close"]).main.params.shared_cells
    with pytest.raises(BadInputError, match="--parallel 0"):
        plan_for(dataclasses.replace(o, parallel=0), tiny["main"], tiny["draft_close"])


def test_the_plan_counts_the_process_and_the_work_buffer(tiny):
    p = plan(tiny, ctx_size=4096)
    assert p.process == PROCESS_BASELINE and p.total == p.process + p.main.total + p.draft.total
    h = read_header(tiny["main"])
    # the f16 V cache: ggml converts each micro-batch's attention scores to f16 (u x cells x heads x 2 bytes)
    assert p.main.work == 2 * 512 * 4096 * max(h.n_head)
    assert plan(tiny, None, ctx_size=4096, cache_type_v="f32").main.work == 0


def test_a_pool_of_n_sequences_decodes_n_times_fewer_rows_at_once_and_plans_that_much_less_compute(tiny):
    """The attention's scores take n_batch x cells: a pool of 4 sequences' cells decodes 128 rows at once, so its
    compute buffer is that of llama-server's 4 streams of a quarter of the cells each, not 4 times it."""
    one, four, eight = (plan(tiny, ctx_size=8192, parallel=n) for n in (1, 4, 8))
    assert one.main.params.n_batch == 512 and four.main.params.n_batch == 128 and four.draft.params.n_batch == 128
    assert eight.main.params.n_batch == 8 * 17  # never fewer rows than a step of 8 sequences verifying 16 drafts
    assert four.main.compute < one.main.compute / 3 and four.main.work == one.main.work // 4
    per_request = plan(tiny, ctx_size=8192, ctx_size_draft=2048, parallel=4).draft  # 4 contexts of one sequence
    assert per_request.contexts == 4 and per_request.params.n_batch == 512


def test_parallel_requests_share_one_draft_context_in_the_plan(tiny):
    one, four = plan(tiny, ctx_size=4096), plan(tiny, ctx_size=4096, parallel=4)
    assert four.main.contexts == 1 and four.main.params.n_ctx == 4096  # --ctx-size: the total, as llama-server's -c
    d = four.draft  # one context of a sequence per request (paged cells): one batched draft decode per position
    assert d.contexts == 1 and d.params.n_ctx == 4096 and d.params.n_seq_max == 4 and d.params.seq_cells
    assert d.total == d.weights + d.overhead + d.kv + d.compute + d.output + d.work
    assert d.kv == one.draft.kv and d.weights == one.draft.weights  # the KV of one draft context, weights once
    assert d.output == 4 * one.draft.output  # a logits row per sequence


def test_a_smaller_parallel_draft_context_is_one_context_per_request(tiny):
    one, four = plan(tiny, ctx_size=4096, ctx_size_draft=2048), plan(tiny, ctx_size=4096, ctx_size_draft=2048,
                                                                      parallel=4)
    d = four.draft  # each can slide its window (paged cells cannot shift)
    assert d.contexts == 4 and d.params.n_ctx == 512 and d.params.n_seq_max == 1 and not d.params.seq_cells
    assert d.total == d.weights + d.overhead + 4 * (d.kv + d.compute + d.output + d.work)
    assert 4 * d.kv == one.draft.kv and d.weights == one.draft.weights  # the KV in all as one draft's; weights once


@pytest.mark.parametrize("ctx_size_draft", [0, 512], ids=["shared", "per-request"])
def test_every_parallel_draft_context_matches_its_plan(tiny, ctx_size_draft):
    o = opts(tiny, "draft_close", ctx_size=1024, ctx_size_draft=ctx_size_draft, parallel=4)
    rt = Runtime(o, spec=SpecOptions(draft_max=8), announce=lambda _s: None)
    try:
        d = rt.plan.draft
        drafters = [rt.sequence_drafter(s) for s in range(4)]
        assert len({id(x.ctx) for x in drafters}) == d.contexts == (1 if ctx_size_draft == 0 else 4)
        assert [x.seq_id for x in drafters] == ([0, 1, 2, 3] if d.contexts == 1 else [0, 0, 0, 0])
        for x in drafters:
            assert x.ctx.params == d.params and x.ctx.n_ctx == d.n_cells
            assert x.window.size >= rt.main.capacity or x.ctx.can_shift  # a window too small for it must slide
            for name, want in (("kv", d.kv), ("compute", d.compute), ("output", d.output_at_load)):
                assert abs(x.ctx.buffers[name] - want) <= max(want // 100, 64 << 10), (name, x.ctx.buffers)
    finally:
        rt.close()


def test_repacked_weights_count_twice_on_the_cpus_that_repack_them(tiny):
    """Which matrices llama.cpp's CPU backend repacks, by type, row count and CPU features."""
    from gguf import GGMLQuantizationType as Q

    from tandem.models.fit import repacked_bytes
    matrices = ((Q.Q4_0, 64, 1000), (Q.Q4_0, 60, 500), (Q.Q4_1, 64, 300), (Q.Q8_0, 64, 200), (Q.F32, 64, 50))
    h = dataclasses.replace(read_header(tiny["main"]), matrices=matrices)
    assert repacked_bytes(h, frozenset({"REPACK", "AVX2"})) == 1000  # 60 rows: not a multiple of 8
    assert repacked_bytes(h, frozenset({"REPACK", "NEON", "DOTPROD"})) == 1000 + 500 + 200  # 4-row layouts
    assert repacked_bytes(h, frozenset({"AVX2"})) == 0  # a build without the repack buffer


def test_the_plan_matches_what_llama_cpp_allocates_for_repacked_weights(tiny, tmp_path, monkeypatch):
    """A Q4_0 model loaded with repacking (every draft; an exact main on a patched library, whose repacked kernels
    give a row the same logits for every batch size) holds its file and a repacked copy of its matrices; an exact
    main on a stock library is loaded without. Before the plan counted repacking, a Q4_0 draft of SmolLM2 took 142
    MiB against 86 planned."""
    from tandem.engine.library import cpu_features, exact_kernels
    from tandem.models.defaults import derive
    from tandem.models.fit import repacked_bytes, repacks
    if not {"REPACK", "AVX2"} <= cpu_features():
        pytest.skip("this CPU has no repacked Q4_0 kernels")
    path = derive(tiny["main"], tmp_path / "tiny-q4_0.gguf", "q4_0")
    header = read_header(path)
    repacked = repacked_bytes(header, cpu_features())
    assert repacked > 32 << 10  # more than the log's 0.01 MiB resolution and the tolerance below
    patched = exact_kernels()
    for exact, stock in ((False, False), (True, False), (True, True)):
        if stock:  # what the plan says for an exact main on a library without the patch
            monkeypatch.setattr("tandem.models.fit.exact_kernels", lambda: False)
        params = ContextParams(n_ctx=256, n_batch=64, n_threads=1, exact=exact)
        assert repacks(params) == (not exact or (patched and not stock))
        planned = plan_model(header, params, role="draft" if not exact else "main").weights
        model = Model(path, repack=repacks(params))
        try:
            assert abs(planned - model.buffers["weights"]) <= 8 << 10, (exact, planned, repacked, model.buffers)
        finally:
            model.close()
