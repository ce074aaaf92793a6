"""What the memory plan needs from a GGUF file: the model's shape and weight size, from its header alone
(parsed by tandem.models.gguf_meta, the one GGUF header reader; no weights, no llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ModelNotFoundError, NotGGUFError
from tandem.models import gguf_meta


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
    matrices: tuple[tuple[int, int, int], ...] = ()
    """(ggml type, rows, bytes) of each 2-D weight a matrix product reads (all but the token embeddings, which
    are looked up by row): the tensors llama.cpp may repack for its CPU kernels (tandem.models.fit)."""

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
    return _header(path, gguf_meta.read_header(path, arrays=()))


def _per_layer(value: object, n_layer: int) -> tuple[int, ...]:
    if isinstance(value, list):
        vals = [int(v) for v in value][:n_layer]
        return tuple(vals + [vals[-1] if vals else 0] * (n_layer - len(vals)))
    return (int(value),) * n_layer  # type: ignore[call-overload]


def _header(path: Path, raw: gguf_meta.GGUFHeader) -> GGUFHeader:
    kv = raw.kv
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
    tokens = kv.get(gguf_meta.TOKENS_KEY)
    n_tokens = tokens.count if isinstance(tokens, gguf_meta.SkippedArray) else 0
    # llama.cpp's vocabulary is the token list; vocab_size only when a file has none
    n_vocab = n_tokens or int(get("vocab_size", 0))  # type: ignore[call-overload]
    return GGUFHeader(path=path, arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                      head_dim_k=int(get("attention.key_length", head_dim)),  # type: ignore[call-overload]
                      head_dim_v=int(get("attention.value_length", head_dim)),  # type: ignore[call-overload]
                      n_ff=n_ff_max, n_vocab=n_vocab,
                      n_ctx_train=int(get("context_length", 0)),  # type: ignore[call-overload]
                      weights_bytes=raw.weights_bytes, n_tensors=len(raw.tensors),
                      matrices=tuple((t.type, t.shape[1], t.n_bytes) for t in raw.tensors
                                     if len(t.shape) == 2 and t.name != "token_embd.weight"))
