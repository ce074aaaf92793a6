"""The loaded llama.cpp library: what its CPU backend was built for, and what of Tandem's patch it carries.

Reads the library only (llama_cpp imported lazily, so pure modules and --help work without it); the engine's
contexts (tandem.engine.llama) act on what it reports.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path


def native():
    """The llama_cpp module (llama-cpp-python's bindings), imported on first use."""
    import llama_cpp

    return llama_cpp


@functools.cache
def cpu_features() -> frozenset[str]:
    """What ggml's CPU backend was built for and found on this machine: the "NAME = 1" entries of
    llama_print_system_info (AVX2, AVX512, NEON, DOTPROD, MATMUL_INT8, REPACK, ...)."""
    info = native().llama_print_system_info().decode("utf-8", "replace")
    return frozenset(m.group(1) for m in re.finditer(r"(\w+) = 1\b", info))


@functools.cache
def patch_level() -> int:
    """The level of Tandem's patch to llama.cpp (patches/llama-cpp-python.patch) in the loaded library: 0 for a
    stock build (installed some other way), which works without what the patch adds (ContextParams.seq_cells)."""
    fn = getattr(native().llama_cpp._lib, "tandem_patch_level", None)
    if fn is None:
        return 0
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


EXACT_KERNELS_LEVEL = 5
"""Patch level from which a row's logits never depend on how many rows share its decode, one included, once the
one-row switch is on (patches/llama-cpp-python.patch, parts 2 and 7): exact decoding then needs no pairing."""


def exact_kernels() -> bool:
    """Whether the loaded library can decode a lone row with the kernels a batch takes (see EXACT_KERNELS_LEVEL)."""
    return patch_level() >= EXACT_KERNELS_LEVEL and one_row_switch() is not None


ONE_ROW_CACHE_TYPES = frozenset({"f16"})
"""KV cache types whose attention products take tinyBLAS for a lone row as for a batch (probed); with an f32 cache
a lone row's attention still takes ggml's dot product, so exact decoding pairs lone rows there."""


@functools.cache
def one_row_switch() -> Callable[[int], None] | None:
    """The patch's tandem_sgemm_one_row(on) in ggml's CPU backend, as loaded with libllama (None if absent). A
    wheel holds each library under several names as separate files, so only the copy already loaded counts
    (RTLD_NOLOAD): another copy would have a switch of its own that no decode reads."""
    base = Path(native().llama_cpp._base_path)
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    for path in sorted(base.glob("*ggml-cpu*")):
        try:
            fn = getattr(ctypes.CDLL(str(path), mode=noload), "tandem_sgemm_one_row", None)
        except OSError:
            continue
        if fn is not None:
            fn.restype, fn.argtypes = None, [ctypes.c_int]
            return fn
    return None
