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

import numpy as np

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


def _lib():
    import llama_cpp  # imported lazily so pure modules and --help work without the native library

    return llama_cpp


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
    lib.llama_backend_init()
    return router


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
    """Parallel sequences sharing the context."""
    flash_attn: bool = False
    """Flash attention. Off by default: on CPU it makes a batch of k+1 tokens give logits up to 5e-2
    away from one-at-a-time decoding, enough to flip greedy tokens (measured on the tiny fixtures)."""
    exact: bool = False
    """Never decode a lone row: a single new token is decoded together with the token before it (whose KV
    cell is rewritten with the same values), and a decode never asks for the logits of one row only.
    llama.cpp's CPU kernels for one row round differently from those for two or more, while every batch of 2+
    rows gives a row the same logits, so a plain step then computes exactly what a verification batch does
    (see tandem.engine.exact). The main model's setting; the draft's contexts decode lone rows."""

    def threads(self) -> int:
        return self.n_threads or (os.cpu_count() or 1)


class Model:
    """Loaded weights plus their vocabulary."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0,
                 progress: Callable[[float], None] | None = None, repack: bool = True):
        """`repack`: let llama.cpp repack weights for its CPU GEMM kernels (extra buffer types). A repacked
        Q4_K matmul switches kernels at 4 rows and changes a row's logits; the exact main model loads without."""
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
            buf = ctypes.create_string_buffer(64)
            n = _lib().llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = _lib().llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            p = self._pieces[token] = buf.raw[:n]
        return p

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def close(self) -> None:
        if getattr(self, "_ptr", None) and not sys.is_finalizing():
            _lib().llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


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
        cp.n_threads = cp.n_threads_batch = params.threads()
        cp.type_k = GGML_TYPES[params.type_k]
        cp.type_v = GGML_TYPES[params.type_v]
        cp.flash_attn_type = 1 if params.flash_attn else 0
        with init_backend().capture() as lines:
            self._ptr = lib.llama_init_from_model(model._ptr, cp)
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
        self._batch = lib.llama_batch_init(params.n_batch, 0, max(1, params.n_seq_max))
        self.tokens_processed = 0
        """How many tokens this context has decoded in all: the draft window's cost counter."""
        self.decode_calls = 0
        self.decode_seconds = 0.0
        """Wall time spent inside llama_decode: the rest of a step's time is Python overhead."""
        if params.exact and (params.n_seq_max != 1 or params.n_batch < 2):
            raise EngineError("exact decoding needs one sequence and n_batch >= 2", "use the memory plan's params")
        self.pairs = params.exact
        """Whether lone rows are decoded with the row before them (see ContextParams.exact; the probe turns it
        off while it measures llama.cpp itself)."""
        self._tokens: list[int] = []  # exact mode: the token at each KV position of sequence 0
        self._solo: int | None = None  # exact mode: a position whose cell a one-row decode wrote (a 1-token prompt)

    def decode(self, tokens: Sequence[int], pos0: int, *, seq_id: int = 0,
               logits: str | Sequence[int] = "last") -> np.ndarray:
        """Decode tokens at positions pos0.. in one sequence.

        `logits` is "last", "all", "none" or the indices (into `tokens`) whose logits to return.
        Returns an array [n_requested, n_vocab] (float32, a copy). Long inputs are split into n_batch chunks.
        """
        n = len(tokens)
        if logits == "last":
            want = [n - 1]
        elif logits == "all":
            want = list(range(n))
        elif logits == "none":
            want = []
        else:
            want = list(logits)
        if self.pairs:
            tokens, pos0, want = self._with_previous(tokens, pos0, seq_id, want)
        out: list[np.ndarray] = []
        chunks = self._chunks(len(tokens))
        try:
            for start, end in chunks:
                chunk_want = [i - start for i in want if start <= i < end]
                if self.pairs and len(chunk_want) == 1 and end - start > 1:
                    # One output row would send the last layer's rows after attention through one-row kernels.
                    i = chunk_want[0]
                    rows = self._decode_chunk(tokens[start:end], pos0 + start, seq_id, sorted({i, i - 1 if i else 1}))
                    out.append(rows[1:] if i else rows[:1])
                else:
                    out.append(self._decode_chunk(tokens[start:end], pos0 + start, seq_id, chunk_want))
        finally:
            if self.pairs:  # what the KV cache holds now: every chunk, or those decoded before an error
                done = chunks[len(out) - 1][1] if out else 0
                self._tokens[pos0:] = tokens[:done]
                self._solo = pos0 if done == 1 else None
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _with_previous(self, tokens: Sequence[int], pos0: int, seq_id: int,
                       want: list[int]) -> tuple[Sequence[int], int, list[int]]:
        """Exact mode: a lone token (or the first token after a cell a one-row decode wrote) is decoded with the
        token before it, which is removed and decoded again: every batch of 2+ rows gives it the same values.
        (decode then also asks for the previous row's logits: a batch's rows after the last layer's attention
        are only those whose logits are asked for, and one such row would take the one-row kernels again.)"""
        if seq_id != 0:
            raise EngineError("exact decoding tracks sequence 0 only", "decode other sequences without exact")
        if len(self._tokens) != pos0:
            raise EngineError(f"exact decoding at position {pos0}, but the cache holds {len(self._tokens)} tokens",
                              "roll back with Context.rollback before decoding again")
        if pos0 == 0 or (len(tokens) > 1 and self._solo != pos0 - 1):
            return tokens, pos0, want
        prev = self._tokens[pos0 - 1]
        self.rollback(pos0 - 1)
        return [prev, *tokens], pos0 - 1, [i + 1 for i in want]

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of each llama_decode call: n_batch tokens each; in exact mode never a lone last row."""
        step = self.params.n_batch
        bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
        if self.pairs and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            (a, b), (_, e) = bounds[-2], bounds[-1]
            bounds[-2:] = [(a, b - 1), (b - 1, e)]
        return bounds

    def _decode_chunk(self, tokens: Sequence[int], pos0: int, seq_id: int, want: Sequence[int]) -> np.ndarray:
        lib = _lib()
        b = self._batch
        n = len(tokens)
        wanted = set(want)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = i in wanted
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = lib.llama_decode(self._ptr, b)
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        if rc != 0:
            hint = ("the KV cache is full: lower max_tokens or raise --ctx-size" if rc == 1
                    else "see the log for llama.cpp's message")
            raise EngineError(f"llama_decode failed with code {rc} for {self.model.name}", hint)
        self.tokens_processed += n
        if not want:
            return np.empty((0, self.model.n_vocab), dtype=np.float32)
        ptr = lib.llama_get_logits(self._ptr)
        return np.ctypeslib.as_array(ptr, shape=(len(want), self.model.n_vocab)).copy()

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
        del self._tokens[pos:]
        if self._solo is not None and self._solo >= pos:
            self._solo = None

    def shift(self, p0: int, p1: int, delta: int, *, seq_id: int = 0) -> None:
        """Drop cells [p0, p1) of the sequence and add `delta` to the positions of all later cells."""
        if self.params.exact:
            raise EngineError("the exact main model's cache cannot shift", "shift draft contexts only")
        lib = _lib()
        lib.llama_memory_seq_rm(self._mem, seq_id, p0, p1)
        lib.llama_memory_seq_add(self._mem, seq_id, p1, -1, delta)

    @property
    def can_shift(self) -> bool:
        """Whether shift() is supported: the model has RoPE and llama.cpp's memory can shift positions."""
        return self.model.can_shift and bool(_lib().llama_memory_can_shift(self._mem))

    def pos_max(self, seq_id: int = 0) -> int:
        """Largest position held for the sequence, -1 when empty."""
        return int(_lib().llama_memory_seq_pos_max(self._mem, seq_id))

    def clear(self) -> None:
        _lib().llama_memory_clear(self._mem, True)
        self._tokens, self._solo = [], None

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
