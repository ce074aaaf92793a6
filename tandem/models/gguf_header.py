"""What the memory plan needs from a GGUF file, read from its header alone (no weights, no llama.cpp).

The gguf package's GGUFReader builds a numpy view per array element: 3.5 s on the default main model's
49k tokenizer strings, per file, on every `tandem serve`. This reads the same header with the gguf
package's types and block sizes in a few tens of milliseconds, skipping string arrays by their lengths.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from tandem.errors import ModelNotFoundError, NotGGUFError

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_MAX_ARRAY_KEPT = 4096
"""Numeric arrays up to this length are kept (per-layer hyperparameters); longer ones are only counted."""


@dataclass(frozen=True)
class GGUFHeader:
    """A model's shape and weight size, as its GGUF header states them."""

    path: Path
    """The file."""
    arch: str
    """general.architecture (llama, qwen2, ...)."""
    n_layer: int
    """Transformer blocks."""
    n_embd: int
    """Embedding width."""
    n_head: tuple[int, ...]
    """Attention heads, per layer."""
    n_head_kv: tuple[int, ...]
    """Key/value heads, per layer (fewer than n_head: grouped-query attention)."""
    head_dim_k: int
    """Width of one key head."""
    head_dim_v: int
    """Width of one value head."""
    n_ff: int
    """Feed-forward width (the largest layer's)."""
    n_vocab: int
    """Tokens in the vocabulary."""
    n_ctx_train: int
    """Context length the model was trained for (0 when unknown)."""
    weights_bytes: int
    """Bytes of tensor data (what llama.cpp maps or loads)."""
    n_tensors: int
    """Tensors in the file."""

    @property
    def name(self) -> str:
        return self.path.stem

    def n_embd_k_gqa(self, layer: int) -> int:
        """Key width of one KV cell in a layer."""
        return self.head_dim_k * self.n_head_kv[layer]

    def n_embd_v_gqa(self, layer: int) -> int:
        """Value width of one KV cell in a layer."""
        return self.head_dim_v * self.n_head_kv[layer]


def check_gguf(path: Path) -> None:
    """Raise ModelNotFoundError for a missing file, NotGGUFError for one without the GGUF magic."""
    if not path.exists():
        raise ModelNotFoundError(f"model file {path} does not exist",
                                 "check the path, or run `tandem models` to list the models found")
    if not path.is_file():
        raise NotGGUFError(f"{path} is not a file", "pass the path of a .gguf model file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise NotGGUFError(f"{path} is not a GGUF model (no GGUF header)",
                           "convert it with llama.cpp's convert_hf_to_gguf.py, or pass a .gguf file")


def read_header(path: str | Path) -> GGUFHeader:
    """The header facts of a GGUF model. Raises ModelNotFoundError / NotGGUFError with a cause and a fix."""
    path = Path(path)
    check_gguf(path)
    try:
        kv, tensors = _parse(path)
    except EOFError as e:
        raise NotGGUFError(f"{path} is truncated: {e}", "the download or conversion did not finish: "
                           "fetch or convert the model again") from e
    except (struct.error, ValueError, KeyError, IndexError, OverflowError) as e:
        raise NotGGUFError(f"{path} has a GGUF magic but its header cannot be read ({type(e).__name__})",
                           "the file is corrupt: download or convert it again") from e
    return _header(path, kv, tensors)


def _per_layer(value: object, n_layer: int) -> tuple[int, ...]:
    if isinstance(value, list):
        vals = [int(v) for v in value][:n_layer]
        return tuple(vals + [vals[-1] if vals else 0] * (n_layer - len(vals)))
    return (int(value),) * n_layer  # type: ignore[call-overload]


def _header(path: Path, kv: dict[str, object], tensors: list[tuple[int, int]]) -> GGUFHeader:
    arch = str(kv.get("general.architecture", "llama"))

    def get(key: str, default: object = None) -> object:
        return kv.get(f"{arch}.{key}", default)

    n_layer = int(get("block_count", 0))  # type: ignore[call-overload]
    n_embd = int(get("embedding_length", 0))  # type: ignore[call-overload]
    if n_layer <= 0 or n_embd <= 0:
        raise NotGGUFError(f"{path} lacks {arch}.block_count or {arch}.embedding_length",
                           "this is not a language model GGUF; pass a model converted by llama.cpp")
    n_head = _per_layer(get("attention.head_count", 1), n_layer)
    n_head_kv = _per_layer(get("attention.head_count_kv", n_head[0]), n_layer)
    head_dim = n_embd // max(1, n_head[0])
    n_ff = get("feed_forward_length", 4 * n_embd)
    n_ff_max = max(_per_layer(n_ff, n_layer)) if n_layer else 0
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = int(get("vocab_size", tokens if isinstance(tokens, int) else 0))  # type: ignore[call-overload]
    if isinstance(tokens, int) and tokens:
        n_vocab = tokens  # llama.cpp's vocabulary is the token list
    weights = sum(n_elems * GGML_QUANT_SIZES[GGMLQuantizationType(t)][1] // GGML_QUANT_SIZES[GGMLQuantizationType(t)][0]
                  for t, n_elems in tensors)
    return GGUFHeader(path=path, arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                      head_dim_k=int(get("attention.key_length", head_dim)),  # type: ignore[call-overload]
                      head_dim_v=int(get("attention.value_length", head_dim)),  # type: ignore[call-overload]
                      n_ff=n_ff_max, n_vocab=n_vocab,
                      n_ctx_train=int(get("context_length", 0)),  # type: ignore[call-overload]
                      weights_bytes=weights, n_tensors=len(tensors))


def _parse(path: Path) -> tuple[dict[str, object], list[tuple[int, int]]]:
    """Key/values (string arrays as their length, long numeric arrays as their length) and
    (ggml type, element count) per tensor."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", m, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError("not a little-endian GGUF v2+ file")
        off = 24

        def string() -> str:
            nonlocal off
            (n,) = struct.unpack_from("<Q", m, off)
            off += 8 + n
            if off > len(m):
                raise ValueError("string past the end of the file")
            return m[off - n:off].decode("utf-8", "replace")

        def skip_strings(count: int) -> None:
            nonlocal off
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", m, off)
                off += 8 + n

        def scalar(t: GGUFValueType) -> object:
            nonlocal off
            fmt = _SCALAR[t]
            (v,) = struct.unpack_from(fmt, m, off)
            off += struct.calcsize(fmt)
            return v

        kv: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack_from("<I", m, off)
            off += 4
            vtype = GGUFValueType(t)
            if vtype == GGUFValueType.STRING:
                kv[key] = string()
            elif vtype != GGUFValueType.ARRAY:
                kv[key] = scalar(vtype)
            else:
                sub_t, count = struct.unpack_from("<IQ", m, off)
                off += 12
                sub = GGUFValueType(sub_t)
                if sub == GGUFValueType.STRING:
                    skip_strings(count)
                    kv[key] = count
                elif sub in _SCALAR:
                    width = struct.calcsize(_SCALAR[sub])
                    kv[key] = ([struct.unpack_from(_SCALAR[sub], m, off + i * width)[0] for i in range(count)]
                               if count <= _MAX_ARRAY_KEPT else count)
                    off += width * count
                else:
                    raise ValueError(f"nested array in {key}")
        tensors: list[tuple[int, int]] = []
        end = 0
        for _ in range(n_tensors):
            string()
            (n_dims,) = struct.unpack_from("<I", m, off)
            off += 4
            dims = struct.unpack_from(f"<{n_dims}Q", m, off)
            off += 8 * n_dims
            type_id, offset = struct.unpack_from("<IQ", m, off)
            off += 12
            n_elems = 1
            for d in dims:
                n_elems *= d
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            end = max(end, offset + n_elems * size // block)
            tensors.append((type_id, n_elems))
        alignment = int(kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
        data_start = -(-off // alignment) * alignment
        if data_start + end > len(m):
            raise EOFError(f"the tensor data ends at byte {data_start + end}, the file has {len(m)}")
        return kv, tensors
