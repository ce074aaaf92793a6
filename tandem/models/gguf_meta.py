"""GGUF header reading without loading weights: metadata keys and tensor infos, from an mmap.

`gguf.GGUFReader` builds a numpy view per array element and takes ~5 s on SmolLM2's 49k-token vocabulary
(and its 49k merges); this reader walks the same header with `struct` in ~50 ms and skips the arrays it is
not asked for. Types, file-type names and block sizes come from the `gguf` package, so they stay in step
with llama.cpp. tests/test_registry.py checks it against GGUFReader on a fixture.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, LlamaFileType

from tandem.errors import ModelNotFoundError, NotGGUFError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
TOKENS_KEY = "tokenizer.ggml.tokens"
"""The vocabulary's token texts: the one big array the registry needs."""
MAX_NUMERIC_ARRAY = 4096
"""Numeric arrays up to this length are always decoded (per-layer hyperparameters such as head counts);
longer ones (token types, scores) only when asked for."""


@dataclass(frozen=True)
class SkippedArray:
    """An array value that was not decoded (not asked for): its element type and length only."""

    type: GGUFValueType
    """Element type."""
    count: int
    """Number of elements."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry."""

    name: str
    """Tensor name, e.g. blk.0.attn_q.weight."""
    type: int
    """ggml type number (GGMLQuantizationType)."""
    n_elements: int
    """Product of the dimensions."""
    offset: int = 0
    """Start of its data, relative to the data section."""
    shape: tuple[int, ...] = ()
    """Its dimensions in ggml's order: shape[1] is a weight matrix's rows (output features)."""

    @property
    def n_bytes(self) -> int:
        """Bytes of the tensor's data (0 for a type this gguf package does not know)."""
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type)]
        except (KeyError, ValueError):
            return 0
        return self.n_elements // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """The metadata and tensor infos of a GGUF file."""

    version: int
    """GGUF format version (2 or 3)."""
    kv: dict[str, Any] = field(repr=False)
    """Metadata: scalars as Python values, strings as str, asked-for arrays and short numeric
    arrays as lists, others as SkippedArray."""
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    """Tensor infos in file order."""

    @property
    def weights_bytes(self) -> int:
        """Bytes of tensor data (what llama.cpp maps)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        """Parameter count: the sum of every tensor's element count (what llama_model_n_params reports)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        """general.file_type's name (F32, F16, Q4_1, Q4_K_M, ...), else the type holding the most bytes."""
        ftype = self.kv.get("general.file_type")
        if isinstance(ftype, int):
            try:
                return LlamaFileType(ftype).name.removeprefix("ALL_").removeprefix("MOSTLY_")
            except ValueError:
                pass
        by_type: dict[int, int] = {}
        for t in self.tensors:
            by_type[t.type] = by_type.get(t.type, 0) + t.n_bytes
        if not by_type:
            return "unknown"
        top = max(by_type, key=by_type.__getitem__)
        try:
            return GGMLQuantizationType(top).name
        except ValueError:
            return f"type{top}"


def read_header(path: str | Path, *, arrays: Collection[str] = (TOKENS_KEY,)) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`, decoding only the arrays named in `arrays`.

    Raises ModelNotFoundError for a missing file and NotGGUFError for anything that is not a complete
    little-endian GGUF v2+ header. Strings decode as UTF-8 with surrogateescape, as llama.cpp's raw
    bytes do in `Model.token_text`.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file {path} does not exist",
                                 "check the path, or run `tandem models` to list the models found") from None
    with f:
        if path.stat().st_size < 24:
            raise _not_gguf(path, "shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                raise _not_gguf(path, "no GGUF header")
            try:
                parser = _Parser(m, set(arrays))
                header = parser.header()
            except (struct.error, ValueError, IndexError, OverflowError) as e:
                raise _not_gguf(path, f"its header is truncated or corrupt ({type(e).__name__})") from None
            end = parser.data_start(header) + max((t.offset + t.n_bytes for t in header.tensors), default=0)
            if end > len(m):
                raise NotGGUFError(f"{path} is truncated: the tensor data ends at byte {end}, the file has {len(m)}",
                                   "the download or conversion did not finish: fetch or convert the model again")
            return header


def _not_gguf(path: Path, why: str) -> NotGGUFError:
    return NotGGUFError(f"{path} is not a GGUF model ({why})",
                        "convert it with llama.cpp's convert_hf_to_gguf.py, or remove it from the models folder")


class _Parser:
    def __init__(self, m: mmap.mmap, arrays: set[str]):
        self.m, self.arrays, self.off = m, arrays, 0

    def _unpack(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.m, self.off)
        self.off += struct.calcsize(fmt)
        return v

    def _bytes(self) -> bytes:
        n = self._unpack("<Q")
        if self.off + n > len(self.m):
            raise ValueError("string past the end of the file")
        self.off += n
        return self.m[self.off - n:self.off]

    def _skip_strings(self, count: int) -> None:
        m, off, unpack = self.m, self.off, struct.unpack_from
        for _ in range(count):
            off += 8 + unpack("<Q", m, off)[0]
        if off > len(m):
            raise ValueError("array past the end of the file")
        self.off = off

    def _value(self, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._bytes().decode("utf-8", "surrogateescape")
        if vtype != GGUFValueType.ARRAY:
            return self._unpack(_SCALARS[vtype])
        sub, count = GGUFValueType(self._unpack("<I")), self._unpack("<Q")
        if key not in self.arrays and not (sub in _SCALARS and count <= MAX_NUMERIC_ARRAY):
            if sub == GGUFValueType.STRING:
                self._skip_strings(count)
            elif sub in _SCALARS:
                self.off += struct.calcsize(_SCALARS[sub]) * count
            else:
                raise ValueError(f"nested array in {key}")
            return SkippedArray(sub, count)
        if sub == GGUFValueType.STRING:
            return [self._bytes().decode("utf-8", "surrogateescape") for _ in range(count)]
        if sub not in _SCALARS:
            raise ValueError(f"nested array in {key}")
        fmt = _SCALARS[sub]
        out = list(struct.unpack_from(f"<{count}{fmt[1]}", self.m, self.off))
        self.off += struct.calcsize(fmt) * count
        return out

    def header(self) -> GGUFHeader:
        self.off = 4
        version = self._unpack("<I")
        if not 2 <= version <= 3:
            raise ValueError(f"unsupported GGUF version {version} (big-endian or v1 files are not supported)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._bytes().decode("utf-8", "replace")
            kv[key] = self._value(GGUFValueType(self._unpack("<I")), key)
        tensors = []
        for _ in range(n_tensors):
            name = self._bytes().decode("utf-8", "replace")
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(self._unpack("<Q") for _d in range(n_dims))
            n = 1
            for d in shape:
                n *= d
            ttype = self._unpack("<I")
            tensors.append(TensorInfo(name, ttype, n, self._unpack("<Q"), shape))
        return GGUFHeader(version, kv, tuple(tensors))

    def data_start(self, header: GGUFHeader) -> int:
        """File offset of the data section: the end of the header, aligned (call after header())."""
        align = header.kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        align = align if isinstance(align, int) and align > 0 else GGUF_DEFAULT_ALIGNMENT
        return -(-self.off // align) * align
