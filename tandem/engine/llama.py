"""A small typed layer over llama-cpp-python's low-level API.

Everything else in Tandem reaches llama.cpp through `Model` and `Context` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.engine import heap
from tandem.engine.library import ONE_ROW_CACHE_TYPES, exact_kernels, one_row_switch, patch_level
from tandem.engine.library import native as _lib
from tandem.engine.vocab import VocabInfo
from tandem.errors import EngineError, LoadFailedError
from tandem.models.gguf_header import check_gguf

log = logging.getLogger("tandem.llama")

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
"""KV cache types accepted on the command line, by llama.cpp's ggml_type number."""

_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
"""ggml log levels (3 warn, 4 error) that surface above DEBUG."""

_VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}

_BUFFER_LINE = re.compile(r"\b(model|KV|RS|compute|output) buffer size = +([\d.]+) MiB")
"""llama.cpp's report of each buffer it allocates (e.g. "CPU KV buffer size =    90.00 MiB")."""
_BUFFER_KIND = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute", "output": "output"}


class LlamaLog:
    """llama.cpp's log callback: every line goes to the "llama.cpp" logger; capture() also hands the lines
    logged by the calling thread to a list, for the buffer sizes llama.cpp reports while allocating."""

    def __init__(self) -> None:
        lib = _lib()
        logger = logging.getLogger("llama.cpp")
        self._sinks: dict[int, list[str]] = {}

        @lib.llama_log_callback
        def _forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", "replace").rstrip()
            if msg:
                sink = self._sinks.get(threading.get_ident())
                if sink is not None:
                    sink.append(msg)
                logger.log(_LOG_LEVELS.get(level, logging.DEBUG), msg)

        self.callback = _forward  # kept alive as long as llama.cpp may call it

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """The lines llama.cpp logs from this thread inside the block."""
        key = threading.get_ident()
        lines: list[str] = []
        self._sinks[key] = lines
        try:
            yield lines
        finally:
            self._sinks.pop(key, None)


def buffer_sizes(lines: Sequence[str]) -> dict[str, int]:
    """Bytes per kind (weights, kv, compute, output) from llama.cpp's "... buffer size = X MiB" lines."""
    out: dict[str, int] = {}
    for line in lines:
        m = _BUFFER_LINE.search(line)
        if m:
            kind = _BUFFER_KIND[m.group(1)]
            out[kind] = out.get(kind, 0) + round(float(m.group(2)) * (1 << 20))
    return out


@functools.cache
def init_backend() -> LlamaLog:
    """Initialise llama.cpp once; route its log lines to Python logging. Returns the log router (kept alive)."""
    lib = _lib()
    router = LlamaLog()
    lib.llama_log_set(router.callback, ctypes.c_void_p(0))
    # ggml's tiled K-quant matmul takes over at 8+ rows and gives a row other logits than the 2-7 row kernel
    # (up to 1.2 on Q6_K, measured), so a 17-token verification would not match a 2-token plain step. Off
    # for the whole process (ggml reads it once); a user who sets it keeps their value.
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    heap.tune()
    lib.llama_backend_init()
    return router


UNKNOWN = -1
"""Context.held()'s entry for a KV position whose token is not known (never equal to a token id)."""

_CREATE_LOCK = threading.Lock()
"""Serialises context creation: the patch reads its placement switch from the environment while creating one."""


@dataclass(frozen=True)
class ContextParams:
    """Everything llama.cpp needs to create a context. Built by the memory plan, nowhere else."""

    n_ctx: int = 4096
    """Context size in tokens (KV cache cells)."""
    n_batch: int = 512
    """Most tokens one llama_decode call takes."""
    n_threads: int = 0
    """CPU threads; 0 means all cores."""
    type_k: str = "f32"
    """KV cache type for K (f32, f16, q8_0, ...). Without `exact`, f32 keeps batched verification closest to
    one-at-a-time decoding; with it, every type gives bit-for-bit the same rows in every batch of 2+."""
    type_v: str = "f32"
    """KV cache type for V."""
    n_seq_max: int = 1
    """Sequences the context can hold at once (seq_id 0..n_seq_max-1), decoded together by decode_batch."""
    kv_unified: bool = True
    """One KV buffer shared by every sequence (n_ctx cells in all). Per-sequence streams (False) make llama.cpp
    split a batch into equal-length pieces per sequence, so a mixed batch would take several decodes."""
    seq_cells: bool = False
    """Place each sequence's KV cells in 64-cell pages (Tandem's llama.cpp patch): position p in the page for p // 64
    at offset p % 64, pages taken on demand (the lowest free page after the sequence's previous one). Attention
    sums run over cells in SIMD groups, so where a sequence's cells sit changes its rounding; pages keep its cells
    in order at the same offsets whatever the others hold, so its logits do not depend on the other sequences in
    the cache or its batch (tandem.engine.exact.probe_sequences), and the cells in use stay packed at the front,
    so attention spans what the sequences hold. Each sequence holds at most n_ctx / n_seq_max positions (rounded
    down to 64), as with llama-server's parallel slots, or up to n_ctx with shared_cells; its cells cannot shift
    (no sliding window)."""
    shared_cells: bool = False
    """With seq_cells: any sequence may hold up to n_ctx positions, all of them taking pages from one pool, as
    llama-server's --kv-unified (the caller keeps the total within the pool: tandem.sched.Scheduler.room). False:
    each holds at most its share, n_ctx / n_seq_max, reserved. Needs patch level 3 (Context.pages_after); from level
    4 a batch attends only over the cells its own sequences span, so idle sequences kept for their prefix cost it
    nothing."""
    flash_attn: bool = False
    """Flash attention. Off by default: on CPU it makes a batch of k+1 tokens give logits up to 5e-2
    away from one-at-a-time decoding, enough to flip greedy tokens (measured on the tiny fixtures)."""
    exact: bool = False
    """Give a row the same logits whatever the number of rows in its decode, so a plain step computes exactly
    what a verification batch does (see tandem.engine.exact). With Tandem's patch (exact_kernels()) a lone row
    takes the kernels of a batch (Context.one_row); with another library it is decoded together with the token
    before it (whose KV cell is rewritten with the same values; Context.pairs), and a decode never asks for the
    logits of one row only. The main model's setting; the draft's contexts decode lone rows as llama.cpp does."""

    def threads(self) -> int:
        return self.n_threads or (os.cpu_count() or 1)


class Model:
    """Loaded weights plus their vocabulary."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0,
                 progress: Callable[[float], None] | None = None, repack: bool = True):
        """`repack`: let llama.cpp repack weights for its CPU GEMM kernels (extra buffer types). On a stock library
        a repacked Q4_K matmul switches kernels at 4 rows and changes a row's logits, so an exact main model loads
        without there (tandem.models.fit.repacks)."""
        lib = _lib()
        log_router = init_backend()
        self.path = Path(path)
        check_gguf(self.path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        if progress is not None:
            @lib.llama_progress_callback
            def _cb(p: float, _user: ctypes.c_void_p) -> bool:
                progress(p)
                return True
            self._progress_cb = _cb  # keep alive while loading
            params.progress_callback = _cb
        with log_router.capture() as lines:
            self._ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            why = next((ln for ln in reversed(lines) if "error" in ln.lower()), "")
            raise LoadFailedError(f"llama.cpp could not load {self.path}" + (f" ({why})" if why else ""),
                                  "check that the file is complete and of an architecture this llama.cpp supports",
                                  code="load_failed")
        self.buffers: dict[str, int] = buffer_sizes(lines)
        """What llama.cpp reported allocating for the weights ({"weights": bytes})."""
        self._vocab = lib.llama_model_get_vocab(self._ptr)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.bos: int = lib.llama_vocab_bos(self._vocab)
        self.eos: int = lib.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self._eog = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self._vocab, t))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._text_pieces: dict[int, bytes] = {}  # special tokens' text (text_piece), on first use
        self._grammar_tokenizer: Any = None  # llguidance's view of the vocabulary, built on first use
        self.name = self.path.stem

    # -- facts -------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return int(_lib().llama_model_size(self._ptr))

    @property
    def n_params(self) -> int:
        return int(_lib().llama_model_n_params(self._ptr))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = _lib().llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")

    @property
    def can_shift(self) -> bool:
        """Whether RoPE positions can be shifted in the KV cache (needed by the sliding draft window)."""
        return int(_lib().llama_model_rope_type(self._ptr)) >= 0

    def token_text(self, token: int) -> str:
        """The vocabulary's text for a token (special tokens included, unlike piece())."""
        return _lib().llama_vocab_get_text(self._vocab, token).decode("utf-8", "surrogateescape")

    def vocab_info(self) -> VocabInfo:
        lib = _lib()
        texts = tuple(self.token_text(i) for i in range(self.n_vocab))
        vtype = _VOCAB_TYPES.get(int(lib.llama_vocab_type(self._vocab)), "unknown")
        return VocabInfo(vtype, self.n_vocab, self.bos, self.eos, self.add_bos, texts)

    # -- text <-> tokens -----------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lib = _lib()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to (special tokens render empty). Cached per token."""
        p = self._pieces[token]
        if p is None:
            p = self._pieces[token] = self._render(token, special=False)
        return p

    def text_piece(self, token: int) -> bytes:
        """The bytes of a token as text, special tokens included (<|im_start|>): what a prompt spells it as, and
        what another tokenizer reads (tandem.spec.translate)."""
        p = self.piece(token)
        if p:
            return p
        p = self._text_pieces.get(token)
        if p is None:
            p = self._text_pieces[token] = self._render(token, special=True)
        return p

    def _render(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = _lib().llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _lib().llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    @property
    def eog_tokens(self) -> frozenset[int]:
        """Every end-of-generation token (EOS, end of turn, ...)."""
        return self._eog

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer over this vocabulary, the end-of-generation tokens as its EOS (grammar masks,
        tandem.spec.grammar). Built on first use (about a second for 50k tokens) and kept."""
        if self._grammar_tokenizer is None:
            import warnings

            from llguidance.llamacpp import lltokenizer_from_vocab

            with warnings.catch_warnings():  # it reads token attributes through a name llama-cpp-python deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                self._grammar_tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self.n_vocab,
                                                                 eos_token=sorted(self._eog))
        return self._grammar_tokenizer

    def close(self) -> None:
        if getattr(self, "_ptr", None) and not sys.is_finalizing():
            _lib().llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class SeqRows:
    """One sequence's part of a batch: `tokens` at positions pos0.. of sequence `seq_id`."""

    seq_id: int
    tokens: Sequence[int]
    pos0: int
    logits: str | Sequence[int] = "last"
    """"last", "all", "none" or the indices (into tokens) whose logits to return."""

    def wanted(self) -> list[int]:
        n = len(self.tokens)
        if self.logits == "last":
            return [n - 1] if n else []
        if self.logits == "all":
            return list(range(n))
        if self.logits == "none":
            return []
        return sorted(self.logits)


class Context:
    """A KV cache and compute state over a Model. Not thread-safe: one engine thread owns it."""

    def __init__(self, model: Model, params: ContextParams):
        lib = _lib()
        self.model = model
        self.params = params
        cp = lib.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_batch
        cp.n_seq_max = params.n_seq_max
        cp.kv_unified = params.kv_unified
        cp.n_threads = cp.n_threads_batch = params.threads()
        cp.type_k = GGML_TYPES[params.type_k]
        cp.type_v = GGML_TYPES[params.type_v]
        cp.flash_attn_type = 1 if params.flash_attn else 0
        placed = params.seq_cells and params.kv_unified and patch_level() > 0
        with init_backend().capture() as lines, _CREATE_LOCK:
            if placed:
                os.environ["LLAMA_KV_SEQ_CELLS"] = "1"
            try:
                self._ptr = lib.llama_init_from_model(model._ptr, cp)
            finally:
                os.environ.pop("LLAMA_KV_SEQ_CELLS", None)
        if not self._ptr:
            why = next((ln for ln in reversed(lines) if "fail" in ln.lower() or "error" in ln.lower()), "")
            raise LoadFailedError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {model.name}"
                                  + (f" ({why})" if why else ""),
                                  "lower --ctx-size or use a smaller KV cache type (--cache-type-k q8_0); "
                                  "`tandem fit` shows what fits", code="load_failed")
        self.buffers: dict[str, int] = buffer_sizes(lines)
        """What llama.cpp reported allocating for this context: {"kv", "compute", "output": bytes}."""
        self._mem = lib.llama_get_memory(self._ptr)
        self.n_ctx: int = lib.llama_n_ctx(self._ptr)
        self.shared: bool = placed and params.shared_cells and patch_level() >= 3
        """Whether the sequences take their pages from one pool (ContextParams.shared_cells): each may hold up to
        n_ctx positions while the others leave room."""
        share = 1 if self.shared else max(1, params.n_seq_max)
        self.seq_capacity: int | None = self.n_ctx // share // 64 * 64 if placed else None
        """With paged cells per sequence (ContextParams.seq_cells, on a patched library): the positions each sequence
        can hold (its share, or the whole pool when shared). None: cells are placed by llama.cpp wherever they are
        free."""
        self._batch = lib.llama_batch_init(params.n_batch, 0, 1)
        self.tokens_processed = 0
        """How many tokens this context has decoded in all: the draft window's cost counter."""
        self.decode_calls = 0
        self.decode_seconds = 0.0
        """Wall time spent inside llama_decode: the rest of a step's time is Python overhead."""
        if params.exact and params.n_batch < 2:
            raise EngineError("exact decoding needs n_batch >= 2", "use the memory plan's params")
        self.one_row = params.exact and exact_kernels() and {params.type_k, params.type_v} <= ONE_ROW_CACHE_TYPES
        """Whether lone rows take the kernels of a batch (ContextParams.exact on a patched library): switched on
        before each of this context's decodes, off before other contexts' (a draft's lone rows keep llama.cpp's
        faster one-row kernels)."""
        self.pairs = params.exact and not self.one_row
        """Whether lone rows are decoded with the row before them (see ContextParams.exact; the probe turns it
        off while it measures llama.cpp itself, and a runtime turns it on when the probe finds lone rows differ)."""
        self._tokens: dict[int, list[int]] = {}  # per sequence, the token at each KV position (see held())
        self._solo: dict[int, int] = {}  # exact mode: per sequence, a position a one-row decode wrote (1-token prompt)

    @property
    def capacity(self) -> int:
        """Positions one sequence may hold: its share of the cells (seq_capacity), else the whole context."""
        return self.seq_capacity or self.n_ctx

    def decode(self, tokens: Sequence[int], pos0: int, *, seq_id: int = 0,
               logits: str | Sequence[int] = "last") -> np.ndarray:
        """Decode tokens at positions pos0.. in one sequence.

        `logits` is "last", "all", "none" or the indices (into `tokens`) whose logits to return.
        Returns an array [n_requested, n_vocab] (float32, a copy). Long inputs are split into n_batch chunks.
        """
        part = SeqRows(seq_id, tokens, pos0, logits)
        want = part.wanted()
        if self.pairs and tokens:  # pair first, so the chunks below count the re-decoded row
            seq_id, tokens, pos0, want = self._with_previous((seq_id, tokens, pos0, want), lone=len(tokens) == 1)
        if len(tokens) <= self.params.n_batch:
            return self.decode_batch([SeqRows(seq_id, tokens, pos0, want)])[0]
        out: list[np.ndarray] = []
        for start, end in self._chunks(len(tokens)):
            chunk_want = [i - start for i in want if start <= i < end]
            out.append(self.decode_batch([SeqRows(seq_id, tokens[start:end], pos0 + start, chunk_want)])[0])
        return np.concatenate(out)

    def decode_batch(self, parts: Sequence[SeqRows]) -> list[np.ndarray]:
        """Decode the rows of several sequences in ONE llama_decode; per part, the logits it asked for.

        Parts name distinct sequences (0 <= seq_id < n_seq_max) and hold at most n_batch rows in all. In exact
        mode a lone row takes a batch's kernels (one_row), or, without them, a batch of one row is decoded with the
        row before it and a batch that asks for one row's logits asks for a second row's too (see
        ContextParams.exact), so no row ever takes llama.cpp's one-row kernels.
        """
        seqs = [p.seq_id for p in parts]
        if len(set(seqs)) != len(seqs) or not all(0 <= s < max(1, self.params.n_seq_max) for s in seqs):
            raise EngineError(f"a batch names sequences {seqs}: each at most once, below {self.params.n_seq_max}",
                              "give every sequence one part, with n_seq_max large enough")
        rows = [(p.seq_id, p.tokens, p.pos0, p.wanted()) for p in parts if p.tokens]
        n = sum(len(r[1]) for r in rows)
        if self.pairs:
            rows = [self._with_previous(r, lone=n == 1) for r in rows]
            n = sum(len(r[1]) for r in rows)
        if n > self.params.n_batch:
            raise EngineError(f"a batch of {n} rows exceeds n_batch {self.params.n_batch}",
                              "split the batch, or use decode() for a long prompt")
        cap = self.seq_capacity
        full = [seq for seq, toks, pos0, _ in rows if cap is not None and pos0 + len(toks) > cap]
        if full:
            raise EngineError(f"sequence {full[0]} would pass the {cap} positions each sequence holds",
                              "lower max_tokens, or raise --ctx-size (each parallel sequence gets its share)")
        done = False
        try:
            logits = self._decode_rows(rows)
            done = True
        finally:  # what the KV cache holds now: every part, or none after an error
            for seq, toks, pos0, _ in rows:
                held = self._tokens.setdefault(seq, [])
                held.extend([UNKNOWN] * (pos0 - len(held)))
                held[pos0:] = list(toks) if done else []
                if self.pairs and n == 1 and done:
                    self._solo[seq] = pos0
                elif self._solo.get(seq, -1) >= pos0:
                    del self._solo[seq]
        out, it = [], iter(logits)
        for p in parts:
            out.append(next(it) if p.tokens else np.empty((0, self.model.n_vocab), dtype=np.float32))
        return out

    def _with_previous(self, row: tuple, *, lone: bool) -> tuple:
        """Exact mode: a lone token (or the first token after a cell a one-row decode wrote) is decoded with the
        token before it, which is removed and decoded again: every batch of 2+ rows gives it the same values."""
        seq, toks, pos0, want = row
        held = self._tokens.setdefault(seq, [])
        if len(held) != pos0:
            raise EngineError(f"exact decoding of sequence {seq} at position {pos0}, but the cache holds "
                              f"{len(held)} tokens", "roll back with Context.rollback before decoding again")
        if pos0 == 0 or not (lone or self._solo.get(seq) == pos0 - 1):
            return row
        prev = held[pos0 - 1]
        self.rollback(pos0 - 1, seq_id=seq)
        return seq, [prev, *toks], pos0 - 1, [i + 1 for i in want]

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of each llama_decode call: n_batch tokens each; in exact mode never a lone last row."""
        step = self.params.n_batch
        bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
        if self.pairs and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            (a, b), (_, e) = bounds[-2], bounds[-1]
            bounds[-2:] = [(a, b - 1), (b - 1, e)]
        return bounds

    def _decode_rows(self, rows: Sequence[tuple]) -> list[np.ndarray]:
        """One llama_decode of (seq_id, tokens, pos0, wanted) parts; the wanted logits per part."""
        lib = _lib()
        b = self._batch
        wanted = {(r, i) for r, (_, _, _, want) in enumerate(rows) for i in want}
        extra = None
        if self.pairs and len(wanted) == 1 and sum(len(r[1]) for r in rows) > 1:
            # One output row would send the last layer's rows after attention through one-row kernels.
            r, i = next(iter(wanted))
            extra = (r, i - 1) if i else (r, 1) if len(rows[r][1]) > 1 else (0 if r else 1, 0)
            wanted.add(extra)
        k = 0
        for r, (seq, toks, pos0, _) in enumerate(rows):
            for i, t in enumerate(toks):
                b.token[k] = t
                b.pos[k] = pos0 + i
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = seq
                b.logits[k] = (r, i) in wanted
                k += 1
        b.n_tokens = k
        t0 = time.perf_counter()
        if (switch := one_row_switch()) is not None:
            switch(1 if self.one_row else 0)
        rc = lib.llama_decode(self._ptr, b)
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        if rc != 0:
            hint = ("the KV cache is full: lower max_tokens or raise --ctx-size" if rc == 1
                    else "see the log for llama.cpp's message")
            raise EngineError(f"llama_decode failed with code {rc} for {self.model.name}", hint)
        self.tokens_processed += k
        n_out = len(wanted)
        all_rows = (np.ctypeslib.as_array(lib.llama_get_logits(self._ptr), shape=(n_out, self.model.n_vocab))
                    if n_out else np.empty((0, self.model.n_vocab), dtype=np.float32))
        # llama.cpp stores the output rows in batch order, which is (part, index) order
        order = {key: j for j, key in enumerate(sorted(wanted))}
        out = []
        for r, (_, _, _, want) in enumerate(rows):
            idx = [order[(r, i)] for i in want]
            out.append(all_rows[idx].copy() if idx else np.empty((0, self.model.n_vocab), dtype=np.float32))
        return out

    @contextlib.contextmanager
    def pairing(self, on: bool) -> Iterator[None]:
        """Decode with lone-row pairing on or off inside the block (the probe and the lone-row timing measure
        llama.cpp itself; a bench baseline decodes as llama.cpp does), then restore it."""
        saved, self.pairs = self.pairs, on
        try:
            yield
        finally:
            self.pairs = saved

    def rollback(self, pos: int, *, seq_id: int = 0) -> None:
        """Forget every cell of the sequence at position >= pos: the one place the KV cache is rewound."""
        if not _lib().llama_memory_seq_rm(self._mem, seq_id, pos, -1):
            raise EngineError(f"llama.cpp refused to roll back sequence {seq_id} to position {pos}",
                              "this model's memory cannot be partially removed (recurrent models); "
                              "disable speculation with --draft none")
        del self._tokens.setdefault(seq_id, [])[pos:]
        if self._solo.get(seq_id, -1) >= pos:
            del self._solo[seq_id]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make sequence dst's first n positions share sequence src's cells (no compute; dst must be empty)."""
        if n > 0:
            _lib().llama_memory_seq_cp(self._mem, src, dst, 0, n)
        self._tokens[dst] = list(self._tokens.get(src, [])[:n])
        if self._solo.get(src, n) < n:
            self._solo[dst] = self._solo[src]

    def shift(self, p0: int, p1: int, delta: int, *, seq_id: int = 0) -> None:
        """Drop cells [p0, p1) of the sequence and add `delta` to the positions of all later cells."""
        if self.params.exact or self.seq_capacity is not None:
            raise EngineError("this context's cells cannot shift (exact decoding, or paged cells per sequence)",
                              "shift draft contexts only")
        lib = _lib()
        lib.llama_memory_seq_rm(self._mem, seq_id, p0, p1)
        lib.llama_memory_seq_add(self._mem, seq_id, p1, -1, delta)
        held = self._tokens.setdefault(seq_id, [])
        if delta == p0 - p1:  # the later cells close the gap: the same tokens, at positions p1 - p0 lower
            del held[p0:p1]
        else:
            held.clear()

    def pages_after(self, seq_id: int = 0) -> int | None:
        """With paged cells (seq_cells): the free 64-cell pages after the last page the sequence holds, which are
        the pages its next positions can take (its pages stay in position order); all free pages when it holds
        none. None without pages (patch level < 3, or cells placed by llama.cpp)."""
        if self.seq_capacity is None or patch_level() < 3:
            return None
        fn = _lib().llama_cpp._lib.tandem_kv_pages_after
        fn.restype, fn.argtypes = ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32]
        n = int(fn(self._ptr, seq_id))
        return n if n >= 0 else None

    def held_length(self, seq_id: int = 0) -> int:
        """How many positions the KV cache holds for the sequence (len(held()), without the copy)."""
        return len(self._tokens.get(seq_id, ()))

    def held(self, seq_id: int = 0) -> list[int]:
        """The tokens the KV cache holds for the sequence, by position (UNKNOWN where a decode left a gap): what a
        new prompt can reuse instead of decoding again (a copy)."""
        return list(self._tokens.get(seq_id, ()))

    @property
    def can_shift(self) -> bool:
        """Whether shift() is supported: the model has RoPE, llama.cpp's memory can shift positions, and the cells
        are not paged per sequence nor decoded exactly (see shift())."""
        return (self.model.can_shift and self.seq_capacity is None and not self.params.exact
                and bool(_lib().llama_memory_can_shift(self._mem)))

    def pos_max(self, seq_id: int = 0) -> int:
        """Largest position held for the sequence, -1 when empty."""
        return int(_lib().llama_memory_seq_pos_max(self._mem, seq_id))

    def clear(self) -> None:
        _lib().llama_memory_clear(self._mem, True)
        self._tokens, self._solo = {}, {}

    def state_bytes(self) -> int:
        return int(_lib().llama_state_get_size(self._ptr))

    def close(self) -> None:
        if getattr(self, "_ptr", None) and not sys.is_finalizing():
            lib = _lib()
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()
