"""The memory plan: what a main model and its draft will allocate, computed before anything is loaded.

GGUF headers (tandem.models.gguf_header) and arithmetic; of llama.cpp only which CPU kernels it has
(tandem.engine.library.cpu_features, for the repacked weights below). The plan builds the
ContextParams that `Runtime` hands to llama.cpp, so `tandem fit` and the real load cannot disagree.

The sizes model llama.cpp 0.3.36 on the CPU (flash attention off, one sequence), as measured from its
own "buffer size" log lines (`tandem bench fit` checks them against a real load):

- weights: the tensor bytes of the file (mapped with MAP_POPULATE, so resident), plus a second copy of each
  weight matrix llama.cpp repacks for its CPU kernels (REPACKED: Q4_0 and Q4_K on x86, for example) in a model
  loaded with repacking (every draft; a main unless it is exact on a library without Tandem's patch).
- KV cache: cells x layers x (K row + V row) at the cache types; cells are the requested context
  rounded up to a multiple of 256 (llama.cpp pads n_ctx: 32 -> 256).
- compute: the worst-case graph of one micro-batch of u = min(512, n_ctx) tokens, whichever is larger
  of the logits (u x (n_vocab + 3 n_embd) floats) and attention (u x ((n_head + 1) x cells
  + 5 n_embd + 2 n_embd_kv) floats: the KQ scores per head plus the mask).
- output: logits rows: one per sequence at load, growing to draft_max + 1 rows while verifying.
- work: ggml's CPU work buffer, allocated by the first decode and kept: with an f16 V cache the attention
  scores of a micro-batch are converted to f16 before they multiply V (u x cells x n_head x 2 bytes).
- overhead: the tokenizer's tables and llama.cpp's bookkeeping, about 256 bytes per vocabulary entry.

With --parallel N the main context holds every request (--ctx-size cells in all, ctx/N per request, as
llama-server's -c and -np), and so does one draft context of as many sequences (paged cells, ctx/N each), where
the scheduler drafts for every request with one decode per draft position. A smaller --ctx-size-draft gives each
request a draft context of its own instead (--ctx-size-draft/N cells, whose window can slide: paged cells cannot):
N draft contexts on one copy of the draft weights. The process itself (Python, the
HTTP server, the modules Tandem imports, the allocator's retained heap) is one more line, PROCESS_BASELINE.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from gguf import GGMLQuantizationType as Q

from tandem.config import ModelOptions
from tandem.engine.library import cpu_features, exact_kernels
from tandem.engine.llama import GGML_TYPES, ContextParams
from tandem.errors import BadInputError, DoesNotFitError, TandemError, about_model
from tandem.models.gguf_header import GGUFHeader, read_header

_X86, _X86_512 = frozenset({"REPACK", "AVX2"}), frozenset({"REPACK", "AVX512"})
_I8MM, _DOT = frozenset({"REPACK", "NEON", "MATMUL_INT8"}), frozenset({"REPACK", "NEON", "DOTPROD"})
REPACKED: dict[int, tuple[tuple[frozenset[str], int], ...]] = {
    Q.Q4_0: ((_X86, 8), (_I8MM, 4), (_DOT, 4)),
    Q.Q4_K: ((_X86, 8), (_I8MM, 8), (_DOT, 8)),
    Q.Q2_K: ((_X86_512, 8),),
    Q.Q5_K: ((_I8MM, 8), (_DOT, 8)),
    Q.Q6_K: ((_I8MM, 8), (_DOT, 8)),
    Q.IQ4_NL: ((_X86, 8), (_DOT, 4)),
    Q.MXFP4: ((_X86, 8), (_DOT, 4)),
    Q.Q8_0: ((_I8MM, 4), (_DOT, 4)),
}
"""The weight types llama.cpp's CPU backend repacks (ggml-cpu repack.cpp, ggml_repack_get_optimal_repack_type):
per type, the CPU features one layout needs and the row multiple it needs. A repacked matrix is copied into
llama.cpp's CPU_REPACK buffer while its pages in the mapped file stay resident, so it counts twice."""

MIB = 1 << 20
GIB = 1 << 30
KV_PAD = 256
"""llama.cpp rounds the context up to a multiple of this many cells."""
N_BATCH = 512
"""Tokens per llama_decode (and per micro-batch) of a context of one sequence."""
STEP_ROWS = 17
"""Rows one sequence adds to a batched step at most: a verification of draft_max (16) drafts and the newest token."""
OVERHEAD_PER_TOKEN = 256
"""Host bytes per vocabulary entry beyond the weights (tokenizer tables), measured on SmolLM2's 49k vocabulary."""
OVERHEAD_FIXED = 1 * MIB
"""Host bytes per model beyond the weights and the tokenizer."""
PROCESS_BASELINE = 96 * MIB
"""Resident bytes of a serving Tandem process beyond its models: the interpreter and the modules it imports
(numpy, FastAPI, uvicorn, pydantic: 66 MiB before any model), the server's threads and request handling, and the
heap the allocator keeps. Measured with `tandem bench memory` (peak RSS minus the planned models)."""
_BLOCK = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
          "q5_0": (32, 22), "q5_1": (32, 24)}
"""KV cache types: (elements per block, bytes per block)."""
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_MAX_CTX = 1 << 20
"""The largest context the plan searches for."""


@dataclass(frozen=True)
class ModelPlan:
    """What one model (main or draft) will allocate, by llama.cpp buffer."""

    role: str
    """'main' or 'draft'."""
    path: Path
    """The GGUF file."""
    params: ContextParams
    """The parameters the context is created with: the only ones llama.cpp ever gets."""
    n_cells: int
    """KV cells llama.cpp allocates: the requested context rounded up to a multiple of 256."""
    weights: int
    """Tensor bytes (llama.cpp's model buffer)."""
    kv: int
    """KV cache bytes (llama.cpp's KV buffer)."""
    compute: int
    """Worst-case compute graph bytes (llama.cpp's compute buffer)."""
    output: int
    """Logits bytes at their peak (llama.cpp's output buffer grows to the most rows one decode returns)."""
    output_at_load: int
    """Logits bytes llama.cpp reserves when it creates the context (one row per sequence)."""
    overhead: int
    """Tokenizer tables and bookkeeping outside llama.cpp's buffers."""
    work: int = 0
    """ggml's CPU work buffer at its peak (per context; allocated by decoding, not at load)."""
    contexts: int = 1
    """Contexts on these weights, each with the KV, compute, output and work above: one for the main model; for the
    draft, one per parallel request (--parallel N)."""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def per_context(self) -> int:
        """Bytes of one context: KV cache, compute, output and work buffers."""
        return self.kv + self.compute + self.output + self.work

    @property
    def total(self) -> int:
        return self.weights + self.overhead + self.contexts * self.per_context

    @property
    def resident_at_load(self) -> int:
        """Bytes resident right after loading one context: the compute, output and work buffers are only touched
        by decoding (and the other drafts' contexts are made when their requests come)."""
        return self.weights + self.kv + self.overhead

    def to_dict(self) -> dict:
        return {"role": self.role, "model": self.name, "path": str(self.path), "n_ctx": self.params.n_ctx,
                "n_cells": self.n_cells, "n_batch": self.params.n_batch, "type_k": self.params.type_k,
                "type_v": self.params.type_v, "weights": self.weights, "kv": self.kv, "compute": self.compute,
                "output": self.output, "work": self.work, "overhead": self.overhead, "contexts": self.contexts,
                "total": self.total}


@dataclass(frozen=True)
class Memory:
    """The memory the plan may use."""

    available: int
    """Bytes the models may take."""
    source: str
    """Where `available` comes from: '--memory-limit' or 'RAM available'."""
    ram_total: int
    """Physical RAM of the machine."""
    vram: int | None = None
    """GPU memory; None: Tandem runs llama.cpp on the CPU only (no layers offloaded)."""


@dataclass(frozen=True)
class Saving:
    """The draft's memory at a smaller context."""

    n_ctx: int
    """Draft context size in tokens (--ctx-size-draft)."""
    total: int
    """The draft's total bytes at that context."""
    saved: int
    """Bytes saved against a draft context equal to the main one."""


@dataclass(frozen=True)
class FitPlan:
    """The memory plan of a main model and its optional draft, and whether it fits."""

    main: ModelPlan
    """The main model."""
    draft: ModelPlan | None
    """The draft model; None without one (or after --draft-optional dropped it)."""
    memory: Memory
    """What is available."""
    max_ctx: int | None
    """Largest --ctx-size (the draft's context following it when not set apart) that fits; None if none."""
    max_ctx_draft: int | None
    """Largest --ctx-size-draft that fits next to the main model as planned; None without a draft, or if none."""
    q8_draft_fits: bool
    """Whether --cache-type-k-draft q8_0 alone would make the plan fit."""
    savings: tuple[Saving, ...]
    """The draft's memory at smaller contexts (what --ctx-size-draft saves)."""
    draft_status: str | None = None
    """Why a draft that was asked for is not in the plan (--draft-optional fell back to plain decoding)."""
    process: int = PROCESS_BASELINE
    """The Tandem process beyond its models (PROCESS_BASELINE)."""

    @property
    def total(self) -> int:
        return self.process + self.main.total + (self.draft.total if self.draft else 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.memory.available

    @property
    def main_fits_alone(self) -> bool:
        return self.process + self.main.total <= self.memory.available

    def fixes(self) -> list[str]:
        """Concrete option changes that make the plan fit (empty when it fits)."""
        if self.fits:
            return []
        out: list[str] = []
        if self.draft is not None and self.main_fits_alone:
            if self.max_ctx_draft is not None:
                out.append(f"--ctx-size-draft {self.max_ctx_draft}")
            if self.q8_draft_fits:
                out.append("--cache-type-k-draft q8_0")
        if self.max_ctx is not None:
            out.append(f"--ctx-size {self.max_ctx}")
        if self.draft is not None:
            out.append("--draft none (no speculation) or --draft-optional (fall back to plain decoding)"
                       if self.main_fits_alone else "--draft none")
        if self.max_ctx is None and not self.main_fits_alone:
            out.append(f"a smaller or more quantized main model (its weights alone take {fmt(self.main.weights)})")
        if self.memory.source == "--memory-limit":
            out.append(f"a larger --memory-limit (this plan needs {fmt(self.total)})")
        return out

    def verdict(self) -> str:
        """One line: fits, or what does not fit and by how much."""
        m = self.memory
        if self.fits:
            return f"fits: {fmt(self.total)} of {fmt(m.available)} ({m.source}), {fmt(m.available - self.total)} spare"
        if self.draft is not None and self.main_fits_alone:
            free = m.available - self.main.total - self.process
            return (f"does not fit: draft {self.draft.name} needs {fmt(self.draft.total)} (KV cache "
                    f"{fmt(self.draft.kv)}, compute {fmt(self.draft.compute)}), {fmt(free)} free after the main "
                    f"model ({m.source} {fmt(m.available)})")
        return (f"does not fit: main {self.main.name} needs {fmt(self.main.total)} (weights {fmt(self.main.weights)}, "
                f"KV cache {fmt(self.main.kv)}, compute {fmt(self.main.compute)})"
                + (f" plus {fmt(self.draft.total)} for the draft" if self.draft else "")
                + f", {fmt(m.available)} available ({m.source})")

    def error(self) -> DoesNotFitError:
        """The typed error for a plan that does not fit: the verdict as cause, the fixes as fix."""
        fixes = self.fixes()
        draft_side = self.draft is not None and self.main_fits_alone
        return DoesNotFitError(self.verdict(), "use " + " or ".join(fixes) if fixes else "free memory",
                               param="draft_model" if draft_side else None, code="insufficient_memory")

    def without_draft(self, reason: str) -> FitPlan:
        return dataclasses.replace(self, draft=None, max_ctx_draft=None, q8_draft_fits=False, savings=(),
                                   draft_status=reason)

    def to_dict(self) -> dict:
        m = self.memory
        return {"main": self.main.to_dict(), "draft": self.draft.to_dict() if self.draft else None,
                "process": self.process, "total": self.total, "available": m.available, "available_source": m.source,
                "ram_total": m.ram_total, "vram": m.vram, "fits": self.fits, "verdict": self.verdict(),
                "max_ctx": self.max_ctx, "max_ctx_draft": self.max_ctx_draft, "fixes": self.fixes(),
                "draft_savings": [dataclasses.asdict(s) for s in self.savings], "draft_status": self.draft_status}


# -- sizes ------------------------------------------------------------------------------------------------------
def fmt(n: int) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def parse_size(text: str | int | None) -> int | None:
    """Bytes from '536870912', '512M', '2G', '1.5GiB' (powers of 1024); None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise BadInputError(f"--memory-limit {text!r} is not a size", "use bytes or a number with K, M, G or T, "
                            "e.g. 512M or 2G", param="memory_limit")
    value = float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper())
    if value < 1:
        raise BadInputError(f"--memory-limit {text!r} is zero", "give a positive size, e.g. 2G", param="memory_limit")
    return int(value)


def available_memory(limit: str | int | None = None) -> Memory:
    """Memory for the models: --memory-limit when given, else what the OS reports as available now."""
    vm = psutil.virtual_memory()
    bytes_ = parse_size(limit)
    if bytes_ is not None:
        return Memory(bytes_, "--memory-limit", vm.total)
    return Memory(int(vm.available), "RAM available", int(vm.total))


def _row(type_: str, n: int) -> int:
    block, size = _BLOCK[type_]
    return -(-n // block) * size


# -- planning one model -----------------------------------------------------------------------------------------
def context_params(opts: ModelOptions, *, draft: bool) -> ContextParams:
    """The context parameters the options ask for (checked): the plan's, and so llama.cpp's, only source."""
    n_ctx = (opts.ctx_size_draft or opts.ctx_size) if draft else opts.ctx_size
    # --parallel N: a draft as large as the main context holds every request's sequence (one batched draft decode
    # per draft position); a smaller one is a context per request, together as large as one
    shared = not draft or n_ctx >= opts.ctx_size
    if not shared and opts.parallel > 1:
        n_ctx = max(128, n_ctx // opts.parallel)
    if opts.ctx_size < 1 or opts.ctx_size_draft < 0:
        raise BadInputError(f"--ctx-size {opts.ctx_size} / --ctx-size-draft {opts.ctx_size_draft} is not a "
                            "context size", "use a positive number of tokens, e.g. --ctx-size 4096")
    if draft and n_ctx > opts.ctx_size:
        raise BadInputError(f"--ctx-size-draft {n_ctx} is larger than --ctx-size {opts.ctx_size}",
                            "use a draft context no larger than the main context")
    suffix = "-draft" if draft else ""
    type_k = opts.cache_type_k_draft if draft else opts.cache_type_k
    type_v = opts.cache_type_v_draft if draft else opts.cache_type_v
    for flag, t in ((f"--cache-type-k{suffix}", type_k), (f"--cache-type-v{suffix}", type_v)):
        if t not in _BLOCK or t not in GGML_TYPES:
            raise BadInputError(f"{flag} {t!r} is not a KV cache type", f"use one of {', '.join(_BLOCK)}")
    if _BLOCK[type_v][0] > 1:
        raise BadInputError(f"--cache-type-v{suffix} {type_v}: llama.cpp quantizes the V cache only with flash "
                            "attention, which Tandem keeps off (it changes batched logits)",
                            f"use --cache-type-v{suffix} f16, and quantize K instead (--cache-type-k{suffix} q8_0)")
    seqs = opts.parallel if shared else 1
    return ContextParams(n_ctx=n_ctx, n_batch=min(n_batch(seqs), n_ctx), n_threads=opts.threads, type_k=type_k,
                         type_v=type_v, exact=wants_exact(opts.exact) and not draft and n_ctx >= 2, n_seq_max=seqs,
                         seq_cells=seqs > 1, shared_cells=seqs > 1 and opts.kv_unified)


def n_batch(seqs: int) -> int:
    """Rows per llama_decode (and llama.cpp's micro-batch) of a context holding `seqs` sequences. The attention's
    scores take n_batch x n_ctx floats in the compute buffer, so N sequences' cells in one pool decode N_BATCH / N
    rows at once: the scores of llama-server's N streams of n_ctx / N cells each (its -np N), and a long prompt
    still goes in chunks of a few hundred tokens. Never fewer than one batched step of every sequence needs."""
    return max(N_BATCH // max(1, seqs), STEP_ROWS * seqs)


def repacked_bytes(header: GGUFHeader, cpu: frozenset[str]) -> int:
    """Bytes of the weight matrices llama.cpp repacks on a CPU with these features (cpu_features())."""
    return sum(size for type_, rows, size in header.matrices
               if any(needs <= cpu and rows % multiple == 0 for needs, multiple in REPACKED.get(type_, ())))


def wants_exact(asked: bool | None) -> bool:
    """The main model's exact decoding (ModelOptions.exact): as asked, and by default wherever it costs nothing,
    i.e. where the library's kernels give a lone row a batch's logits (exact_kernels())."""
    return exact_kernels() if asked is None else asked


def repacks(params: ContextParams) -> bool:
    """Whether a model with this context is loaded with repacked weights (Model(repack=...)). An exact main's are
    not on a stock library, whose repacked Q4_K kernels change a row's rounding with the batch's size; with
    Tandem's patch they do not (tandem.engine.exact)."""
    return not params.exact or exact_kernels()


def plan_model(header: GGUFHeader, params: ContextParams, *, role: str, out_rows: int = 1,
               contexts: int = 1, cpu: frozenset[str] | None = None) -> ModelPlan:
    """The memory of one model with `contexts` contexts of `params`; `out_rows`: most logits rows one decode
    returns; `cpu`: the CPU features that decide which weights are repacked (None: this machine's)."""
    h = header
    weights = h.weights_bytes
    if repacks(params) and h.matrices:
        weights += repacked_bytes(h, cpu_features() if cpu is None else cpu)
    # One unified KV buffer of n_ctx cells holds every sequence; per-sequence streams hold n_ctx each
    cells = -(-params.n_ctx // KV_PAD) * KV_PAD * (1 if params.kv_unified else params.n_seq_max)
    kv = cells * sum(_row(params.type_k, h.n_embd_k_gqa(i)) + _row(params.type_v, h.n_embd_v_gqa(i))
                     for i in range(h.n_layer))
    u = min(params.n_batch, params.n_ctx)
    n_embd_kv = max(h.n_embd_k_gqa(i) for i in range(h.n_layer))
    logits = h.n_vocab + 3 * h.n_embd
    attention = (max(h.n_head) + 1) * cells + 5 * h.n_embd + 2 * n_embd_kv
    compute = 4 * u * max(logits, attention)
    output = 4 * h.n_vocab * max(params.n_seq_max, out_rows)
    overhead = OVERHEAD_PER_TOKEN * h.n_vocab + OVERHEAD_FIXED
    # KQ x V: ggml converts the f32 scores to V's dot type first (f16 V); an f32 V multiplies them as they are
    work = 0 if params.type_v == "f32" else 2 * u * cells * max(h.n_head)
    return ModelPlan(role, h.path, params, cells, weights, kv, compute, output,
                     4 * h.n_vocab * params.n_seq_max, overhead, work, contexts)


def draft_plan(header: GGUFHeader, opts: ModelOptions) -> ModelPlan:
    """The draft's memory: one copy of its weights, and one context holding every parallel request's sequence, or
    (a smaller --ctx-size-draft) a context per request."""
    params = context_params(opts, draft=True)
    return plan_model(header, params, role="draft", contexts=1 if params.n_seq_max > 1 else max(1, opts.parallel))


# -- planning the pair ------------------------------------------------------------------------------------------
def make_plan(opts: ModelOptions, main: GGUFHeader, draft: GGUFHeader | None, memory: Memory, *,
              draft_max: int = 8) -> FitPlan:
    """The plan for `opts` with these models, plus the largest contexts that fit and what a smaller draft
    context saves. Raises BadInputError for invalid options only; a plan that does not fit is returned."""
    def pair(o: ModelOptions) -> tuple[ModelPlan, ModelPlan | None]:
        m = plan_model(main, context_params(o, draft=False), role="main", out_rows=draft_max + 1)
        d = draft_plan(draft, o) if draft else None
        return m, d

    def total(o: ModelOptions) -> int:
        m, d = pair(o)
        return PROCESS_BASELINE + m.total + (d.total if d else 0)

    m, d = pair(opts)
    fits = _largest(lambda n: total(dataclasses.replace(opts, ctx_size=n, ctx_size_draft=min(
        opts.ctx_size_draft, n))) <= memory.available)
    fits_draft = None
    q8 = False
    savings: list[Saving] = []
    if d is not None:
        free = memory.available - m.total - PROCESS_BASELINE
        fits_draft = _largest(lambda n: draft_plan(draft, dataclasses.replace(
            opts, ctx_size_draft=n)).total <= free, limit=opts.ctx_size)
        if _BLOCK[opts.cache_type_k_draft][0] == 1:
            q8 = total(dataclasses.replace(opts, cache_type_k_draft="q8_0")) <= memory.available
        full = draft_plan(draft, dataclasses.replace(opts, ctx_size_draft=0)).total
        n = opts.ctx_size
        while n >= KV_PAD and len(savings) < 6:
            t = draft_plan(draft, dataclasses.replace(opts, ctx_size_draft=n)).total
            savings.append(Saving(n, t, full - t))
            n //= 2
        if opts.ctx_size_draft and all(s.n_ctx != opts.ctx_size_draft for s in savings):
            savings.append(Saving(opts.ctx_size_draft, d.total, full - d.total))
            savings.sort(key=lambda s: -s.n_ctx)
    return FitPlan(m, d, memory, fits, fits_draft, q8, tuple(savings))


def _largest(ok: Callable[[int], bool], *, limit: int = _MAX_CTX) -> int | None:
    """The largest multiple of 256 up to `limit` (or `limit` itself) for which ok() holds; ok must be monotone."""
    if ok(limit):
        return limit
    if not ok(KV_PAD):
        return None
    lo, hi = 1, -(-limit // KV_PAD)  # ok(lo * 256) holds, ok(hi * 256) does not (or hi * 256 > limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid * KV_PAD) else (lo, mid)
    return lo * KV_PAD


def plan_for(opts: ModelOptions, main: Path, draft: Path | None, *, draft_max: int = 8,
             memory: Memory | None = None) -> FitPlan:
    """The plan Runtime loads from: headers read, fit checked. Raises the first reason not to load.

    A draft that is missing, not GGUF, or does not fit is an error, unless opts.draft_optional: then the
    plan drops it and says why in `draft_status`.
    """
    if not 1 <= opts.parallel <= 64:
        raise BadInputError(f"--parallel {opts.parallel} is not between 1 and 64", "use e.g. --parallel 4")
    if opts.parallel > 1 and not opts.kv_unified and opts.ctx_size // opts.parallel < 128:
        raise BadInputError(f"--ctx-size {opts.ctx_size} with --no-kv-unified leaves each of --parallel "
                            f"{opts.parallel} requests fewer than 128 positions",
                            f"raise --ctx-size to at least {128 * opts.parallel}, or share it (--kv-unified)")
    memory = memory or available_memory(opts.memory_limit)
    try:
        main_header = read_header(main)
    except TandemError as e:
        raise about_model(e, "main") from None
    draft_header, status = None, None
    if draft is not None:
        try:
            draft_header = read_header(draft)
        except TandemError as e:
            if not opts.draft_optional:
                raise about_model(e, "draft") from None
            status = f"draft {draft.name} is not usable: {e.message}"
    plan = make_plan(opts, main_header, draft_header, memory, draft_max=draft_max)
    if status is not None:
        plan = plan.without_draft(status)
    if not plan.fits:
        if plan.draft is not None and plan.main_fits_alone and opts.draft_optional:
            return plan.without_draft(f"draft {plan.draft.name} dropped: {plan.error().message}")
        raise plan.error()
    return plan


def headroom(plan: FitPlan) -> int:
    """Bytes free for one more model next to a loaded plan: under --memory-limit what the plan leaves of it,
    else what the OS reports as available now (the loaded models are already out of it)."""
    if plan.memory.source == "--memory-limit":
        return plan.memory.available - plan.total
    return available_memory().available


def plan_extra_draft(opts: ModelOptions, path: Path, free: int) -> ModelPlan:
    """The plan of a draft loaded on demand (a request's draft_model) with `free` bytes left; DoesNotFitError
    (HTTP 507) when it does not fit."""
    header = read_header(path)
    plan = draft_plan(header, opts)
    if plan.total > free:
        best = _largest(lambda n: draft_plan(header, dataclasses.replace(opts, ctx_size_draft=n)).total <= free,
                        limit=opts.ctx_size)
        hint = (f"start the server with --ctx-size-draft {best}" if best else
                "use a smaller draft, or start the server with more memory (--memory-limit)")
        raise DoesNotFitError(f"draft {plan.name} needs {fmt(plan.total)} (weights {fmt(plan.weights)}, KV cache "
                              f"{fmt(plan.kv)}, compute {fmt(plan.compute)}), {fmt(max(free, 0))} free",
                              hint, param="draft_model", code="insufficient_memory")
    return plan


# -- checking a load against its plan ---------------------------------------------------------------------------
def tolerance(planned: int) -> int:
    """How far a measurement may be from the plan: 5% or 32 MiB, whichever is larger."""
    return max(planned // 20, 32 * MIB)


@dataclass(frozen=True)
class AllocationCheck:
    """One model's plan next to what llama.cpp reported allocating and what the process grew by."""

    plan: ModelPlan
    """The plan the model was loaded from."""
    measured: dict[str, int]
    """llama.cpp's reported buffer bytes: weights, kv, compute, output."""
    rss_delta: int | None
    """Resident memory the process gained loading the model and creating its context (None: not measured)."""

    def rows(self) -> list[tuple[str, int, int | None]]:
        """(component, planned bytes, measured bytes or None) per buffer, then the RSS line."""
        p, m = self.plan, self.measured
        out: list[tuple[str, int, int | None]] = [
            ("weights", p.weights, m.get("weights")), ("KV cache", p.kv, m.get("kv")),
            ("compute", p.compute, m.get("compute")), ("output at load", p.output_at_load, m.get("output"))]
        out.append(("resident at load (RSS)", p.resident_at_load, self.rss_delta))
        return out

    @property
    def within_tolerance(self) -> bool:
        """Every reported buffer, their sum, and the RSS growth within tolerance() of the plan."""
        return all(got is None or abs(got - want) <= tolerance(want) for _, want, got in self.rows())

    def describe(self) -> str:
        parts = [f"{name} {fmt(want)} planned / " + (f"{fmt(got)} ({_signed(got - want)})" if got is not None
                                                    else "not reported") for name, want, got in self.rows()]
        return f"{self.plan.role} {self.plan.name}: " + "; ".join(parts)


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + fmt(abs(n))
