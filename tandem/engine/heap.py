"""The C allocator of a process that holds llama.cpp's large buffers (glibc malloc; elsewhere nothing is done).

llama.cpp reallocates ggml's CPU work buffer as the KV cache fills (64 MiB at 7,680 cells of SmolLM2-135M). glibc
serves blocks this large with mmap, but each one it frees raises its mmap threshold (up to 32 MiB), after which
blocks of up to that size come from the heap and stay resident once freed: loading a model and decoding a long
prompt left 22 MiB of free heap in a Tandem process. A fixed threshold keeps large blocks out of the heap (and turns
the adjustment off), two arenas keep the server's threads from each growing their own, and trimming after a load
hands back what loading left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""mallopt parameters (malloc.h)."""
MMAP_THRESHOLD = 4 << 20
"""Blocks from this size up are mapped on their own and unmapped when freed."""
TRIM_THRESHOLD = 4 << 20
"""Free bytes at the top of the heap glibc returns to the system after a free."""
ARENAS = 2
"""Malloc arenas for all threads together."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


@functools.cache
def tune() -> bool:
    """Set the thresholds and arenas once per process (before llama.cpp allocates); False where not glibc."""
    lib = _libc()
    if lib is None:
        return False
    return all(lib.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)))


def release() -> bool:
    """Return the heap's free pages to the system (malloc_trim); True when some were."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False
