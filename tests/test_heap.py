"""The allocator settings of a Tandem process (tandem.engine.heap)."""

from __future__ import annotations

import ctypes.util

import pytest

from tandem.engine import heap
from tandem.engine.llama import init_backend


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no C library to tune")
def test_loading_the_backend_fixes_the_mmap_threshold_and_a_trim_runs():
    init_backend()
    assert heap.tune() is True  # once per process: cached, mallopt accepted every setting
    assert isinstance(heap.release(), bool)
