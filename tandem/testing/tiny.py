"""Deterministic tiny GGUF language models for tests.

Builds small llama-architecture GGUF files with random weights (``numpy``
``default_rng``) and the real SmolLM2-135M-Instruct tokenizer, so tests can
tokenize real text and run llama.cpp end to end in milliseconds.  The same
:class:`TinySpec` always produces a byte-identical file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from tandem.models.defaults import draft_path

__all__ = ["QWEN_TOOLS", "TinySpec", "build_extra", "build_fixture_set", "build_tiny_model", "fixture_specs",
           "smollm2_gguf_path"]

# Bump whenever the bytes written for a given spec change (invalidates fixture caches).
BUILDER_VERSION = "1"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIFF_RANGE = range(1000, 2000)  # token ids renamed for vocab="different"
# Scalar GGUF value types -> struct format (little-endian).
_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}

KV = tuple[GGUFValueType, "GGUFValueType | None", Any]  # (type, array sub-type, value)
_QWEN_TOOL_IDS = (3, 4)
"""vocab "qwen-tools": the special tokens renamed <tool_call> and </tool_call> (user-defined, as in Qwen2.5)."""
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
"""Qwen2.5-Instruct's chat template (as its GGUFs carry it): tools in the system turn, calls as <tool_call>."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF whose tokenizer the tiny models reuse."""
    return draft_path()


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model's bytes."""

    seed: int = 0
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 4  # < n_head gives grouped-query attention
    n_ff: int = 128
    n_ctx_train: int = 2048
    scale: float = 0.3  # std of random weights; 0.3 gives diverse greedy output
    vocab: str = "smollm2"  # "smollm2", "different", "qwen-tools", "other" (another tokenizer) or "wordpiece" (no text)
    # If set, weights = those of replace(self, seed=noise_from) + noise_scale * N(0, 1) drawn
    # from `seed`; dims/scale come from this spec, so keep them equal to the base model's.
    noise_from: int | None = None
    noise_scale: float = 0.0
    ftype: str = "f32"  # storage of 2-D weights: "f32" or "f16" (norms stay f32)
    name: str = "tiny"  # general.name
    arch: str = "llama"  # general.architecture: "llama" or "gemma3" (q/k norms and post-norms added)
    chat_template: bool = True  # keep SmolLM2's tokenizer.chat_template (False: the file carries none)

    def digest(self) -> str:
        """Short stable hash of the spec (and builder version), for cache file names. Fields added later count
        only when they differ from their defaults, so older specs keep their hashes (and cached files)."""
        values = dataclasses.astuple(self)
        extra = tuple((f.name, v) for f, v in zip(dataclasses.fields(self), values)
                      if f.name in _LATER_FIELDS and v != f.default)
        blob = repr((BUILDER_VERSION, values[:-len(_LATER_FIELDS)] + extra)).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


_LATER_FIELDS = ("arch", "chat_template")
"""TinySpec's last fields, added after fixtures were first cached (see TinySpec.digest)."""


def _read_kv(path: Path) -> dict[str, KV]:
    """Parse only the GGUF key/value header of ``path``.

    ``gguf.GGUFReader`` builds numpy memmap views for every array element and
    takes 4-7 s on SmolLM2's 98k tokenizer strings; this direct parse takes ~50 ms.
    Strings are kept as raw ``bytes`` (GGUFWriter writes them back verbatim).
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", m, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a little-endian GGUF v2+ file")
        off = 24

        def string() -> bytes:
            nonlocal off
            (n,) = struct.unpack_from("<Q", m, off)
            off += 8 + n
            return m[off - n:off]

        def scalar(t: GGUFValueType) -> Any:
            nonlocal off
            fmt = _SCALAR_FMT[t]
            off += struct.calcsize(fmt)
            return struct.unpack_from(fmt, m, off - struct.calcsize(fmt))[0]

        out: dict[str, KV] = {}
        for _ in range(n_kv):
            key = string().decode()
            (t,) = struct.unpack_from("<I", m, off)
            off += 4
            vtype = GGUFValueType(t)
            if vtype == GGUFValueType.STRING:
                out[key] = (vtype, None, string())
            elif vtype != GGUFValueType.ARRAY:
                out[key] = (vtype, None, scalar(vtype))
            else:
                sub_t, count = struct.unpack_from("<IQ", m, off)
                off += 12
                sub = GGUFValueType(sub_t)
                if sub == GGUFValueType.STRING:
                    value: list[Any] = [string() for _ in range(count)]
                elif sub in _SCALAR_FMT:
                    dt = np.dtype(_SCALAR_FMT[sub])
                    value = np.frombuffer(m, dt, count, off).tolist()
                    off += dt.itemsize * count
                else:
                    raise ValueError(f"{path}: nested arrays are not supported ({key})")
                out[key] = (vtype, sub, value)
        return out


@functools.lru_cache(maxsize=None)
def _tokenizer_kv(vocab: str) -> tuple[tuple[str, KV], ...]:
    """All ``tokenizer.*`` metadata of SmolLM2, optionally with a perturbed vocabulary."""
    kv = {k: v for k, v in _read_kv(smollm2_gguf_path()).items() if k.startswith("tokenizer.")}
    if vocab == "different":
        vtype, sub, tokens = kv["tokenizer.ggml.tokens"]
        tokens = list(tokens)
        for i in _DIFF_RANGE:
            tokens[i] = b"<diff_%d>" % i
        kv["tokenizer.ggml.tokens"] = (vtype, sub, tokens)
    elif vocab == "qwen-tools":  # Qwen2.5's tool tokens and chat template over SmolLM2's vocabulary
        (open_, close), user_defined = _QWEN_TOOL_IDS, 4
        for key, i, value in (("tokens", open_, b"<tool_call>"), ("tokens", close, b"</tool_call>"),
                              ("token_type", open_, user_defined), ("token_type", close, user_defined)):
            vtype, sub, values = kv[f"tokenizer.ggml.{key}"]
            values = list(values)
            values[i] = value
            kv[f"tokenizer.ggml.{key}"] = (vtype, sub, values)
        kv["tokenizer.chat_template"] = (GGUFValueType.STRING, None, QWEN25_TEMPLATE)
    elif vocab == "other":
        kv = _other_vocab(kv)
    elif vocab == "wordpiece":
        return _wordpiece_vocab()
    elif vocab != "smollm2":
        raise ValueError(f"unknown vocab {vocab!r}; expected 'smollm2', 'different', 'qwen-tools', 'other' or 'wordpiece'")
    return tuple(kv.items())


_OTHER_SIZE, _OTHER_ROTATE = 32768, 3000
"""vocab="other": SmolLM2's first _OTHER_SIZE tokens (and the merges that make them), the ordinary ones renumbered
by a rotation: another tokenizer over the same text encoding (byte-level BPE), with other ids, that cuts rarer words
finer. A draft with it drafts for a SmolLM2-vocabulary main only through text (tandem.spec.translate). Built on the
main model's weights (noise_from, token rows renumbered the same way) it is the main model restricted to those
tokens: it agrees with the main wherever both cut the text alike, as a smaller model of another family would often."""


def _other_order(n_tokens: int, types: list[int]) -> list[int]:
    """SmolLM2 token id of each "other" token id: the special tokens first (BOS, EOS and the chat markers keep their
    ids), then the ordinary ones rotated."""
    specials = types.index(1)
    n = n_tokens - specials
    return list(range(specials)) + [specials + (i + _OTHER_ROTATE) % n for i in range(n)]


def _other_vocab(kv: dict[str, KV]) -> dict[str, KV]:
    tokens = kv["tokenizer.ggml.tokens"][2][:_OTHER_SIZE]
    types = kv["tokenizer.ggml.token_type"][2][:_OTHER_SIZE]
    order = _other_order(len(tokens), types)
    kept = set(tokens)
    merges = [m for m in kv["tokenizer.ggml.merges"][2] if m.replace(b" ", b"", 1) in kept
              and all(part in kept for part in m.split(b" ", 1))]
    out = dict(kv)
    for key, values in (("tokens", tokens), ("token_type", types)):
        vtype, sub, _ = kv[f"tokenizer.ggml.{key}"]
        out[f"tokenizer.ggml.{key}"] = (vtype, sub, [values[i] for i in order])
    vtype, sub, _ = kv["tokenizer.ggml.merges"]
    out["tokenizer.ggml.merges"] = (vtype, sub, merges)
    return out


def _wordpiece_vocab() -> tuple[tuple[str, KV], ...]:
    """vocab="wordpiece": a BERT-style WordPiece vocabulary (lower-case letters and digits): a tokenizer Tandem does
    not translate from (no shared text encoding with byte-level BPE), so no SmolLM2-vocabulary main can use a draft
    with it."""
    tokens = [b"[PAD]", *(b"[unused%d]" % i for i in range(99)), b"[UNK]", b"[CLS]", b"[SEP]", b"[MASK]",
              *(c.encode() for c in "abcdefghijklmnopqrstuvwxyz0123456789"),
              *(b"##" + c.encode() for c in "abcdefghijklmnopqrstuvwxyz0123456789")]
    types = [3, *([3] * 99), 2, 3, 3, 3, *([1] * 72)]
    A, S, U32, I32 = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.INT32
    return (("tokenizer.ggml.model", (S, None, b"bert")),
            ("tokenizer.ggml.tokens", (A, S, tokens)),
            ("tokenizer.ggml.token_type", (A, I32, types)),
            ("tokenizer.ggml.bos_token_id", (U32, None, 101)),
            ("tokenizer.ggml.unknown_token_id", (U32, None, 100)),
            ("tokenizer.ggml.padding_token_id", (U32, None, 0)))


def _shapes(spec: TinySpec, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and numpy shapes (GGUF/ggml shape reversed) in file order."""
    e, ff, kv_dim = spec.n_embd, spec.n_ff, spec.n_embd // spec.n_head * spec.n_head_kv
    out: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (n_vocab, e)), ("output_norm.weight", (e,)),
    ]
    head = spec.n_embd // spec.n_head
    gemma = (("attn_q_norm", (head,)), ("attn_k_norm", (head,)), ("post_attention_norm", (e,)),
             ("post_ffw_norm", (e,))) if spec.arch == "gemma3" else ()
    for i in range(spec.n_layer):
        out += [(f"blk.{i}.{n}.weight", s) for n, s in (
            ("attn_norm", (e,)), ("attn_q", (e, e)), ("attn_k", (kv_dim, e)), ("attn_v", (kv_dim, e)),
            ("attn_output", (e, e)), ("ffn_norm", (e,)), ("ffn_gate", (ff, e)), ("ffn_up", (ff, e)),
            ("ffn_down", (e, ff)), *gemma,
        )]
    return out


def _weights(spec: TinySpec, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """Random float32 weights for ``spec``; 1-D tensors (RMS norms) are all ones."""
    def draw(seed: int) -> list[tuple[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [(name, np.ones(shape, np.float32) if len(shape) == 1
                 else rng.standard_normal(shape, dtype=np.float32))
                for name, shape in _shapes(spec, n_vocab)]

    if spec.noise_from is None:
        tensors = draw(spec.seed)
        return [(n, t if t.ndim == 1 else t * np.float32(spec.scale)) for n, t in tensors]
    base, noise = draw(spec.noise_from), draw(spec.seed)
    s, ns = np.float32(spec.scale), np.float32(spec.noise_scale)
    return [(n, b if b.ndim == 1 else b * s + z * ns) for (n, b), (_, z) in zip(base, noise, strict=True)]


def build_tiny_model(out_path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a llama-architecture GGUF for ``spec`` to ``out_path`` (atomically) and return it."""
    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv:
        raise ValueError(f"n_embd/n_head/n_head_kv are incompatible in {spec}")
    if spec.ftype not in ("f32", "f16"):
        raise ValueError(f"ftype must be 'f32' or 'f16', got {spec.ftype!r}")
    if spec.arch not in ("llama", "gemma3"):
        raise ValueError(f"arch must be 'llama' or 'gemma3', got {spec.arch!r}")
    out_path = Path(out_path)
    tok = dict(_tokenizer_kv(spec.vocab))
    if not spec.chat_template:
        tok.pop("tokenizer.chat_template", None)
    n_vocab = len(tok["tokenizer.ggml.tokens"][2])

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    w = GGUFWriter(tmp, arch=spec.arch)
    w.add_name(spec.name)
    w.add_file_type(LlamaFileType.ALL_F32 if spec.ftype == "f32" else LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(n_vocab)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if spec.arch == "gemma3":
        w.add_key_length(spec.n_embd // spec.n_head)
        w.add_value_length(spec.n_embd // spec.n_head)
    else:
        w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    for key, (vtype, sub, value) in tok.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    tensors = _weights(spec, n_vocab)
    if spec.vocab == "other":  # the SmolLM2-vocabulary model's weights, token rows renumbered as the vocabulary is
        full = dict(_tokenizer_kv("smollm2"))
        order = _other_order(n_vocab, list(full["tokenizer.ggml.token_type"][2][:n_vocab]))
        base = _weights(dataclasses.replace(spec, vocab="smollm2"), len(full["tokenizer.ggml.tokens"][2]))
        tensors = [(name, t[order] if name == "token_embd.weight" else t) for name, t in base]
    for name, t in tensors:
        w.add_tensor(name, t.astype(np.float16) if spec.ftype == "f16" and t.ndim > 1 else t)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)  # atomic: concurrent builders (xdist) never see partial files
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out_path


def fixture_specs(draft_close_noise: float = 0.003) -> dict[str, TinySpec]:
    """The standard fixture family: a main model and drafts of varying agreement."""
    main = TinySpec(seed=1, name="tiny-main")
    return {
        "main": main,
        "draft_same": dataclasses.replace(main, name="tiny-draft-same"),
        "draft_close": TinySpec(seed=2, noise_from=1, noise_scale=draft_close_noise,
                                name="tiny-draft-close"),
        "draft_small": TinySpec(seed=3, n_layer=1, name="tiny-draft-small"),
        # a draft with no text encoding in common with the main model: unusable (see _wordpiece_vocab)
        "different_vocab": TinySpec(seed=4, vocab="wordpiece", name="tiny-different-vocab"),
        # a draft with another tokenizer over the same text encoding: it drafts through text (see _other_vocab)
        "other_vocab": TinySpec(seed=7, vocab="other", noise_from=1, noise_scale=0.0, name="tiny-other-vocab"),
        "main_f16": dataclasses.replace(main, ftype="f16", name="tiny-main-f16"),
        # several times the main model's cost per token: a draft that can never pay
        "draft_heavy": TinySpec(seed=5, n_layer=4, n_embd=512, n_ff=1024, ftype="f16", name="tiny-draft-heavy"),
        # a Gemma-3-architecture base model without a chat template (as Gemma-3-270M ships)
        "gemma3": TinySpec(seed=6, arch="gemma3", chat_template=False, name="tiny-gemma3"),
    }


QWEN_TOOLS = TinySpec(seed=1, vocab="qwen-tools", name="tiny-qwen-tools")
"""The main model's weights with Qwen2.5's chat template and <tool_call>/</tool_call> tokens (built on demand)."""


def build_extra(out_dir: str | Path, spec: TinySpec) -> Path:
    """A fixture outside the standard set, built once into ``out_dir`` (keyed by spec hash, as the set is)."""
    path = Path(out_dir) / f"{spec.name}-{spec.digest()}.gguf"
    return path if path.is_file() else build_tiny_model(path, spec)


def build_fixture_set(out_dir: str | Path) -> dict[str, Path]:
    """Build (or reuse, keyed by spec hash in the file name) the standard fixtures in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, spec in fixture_specs().items():
        path = out_dir / f"{spec.name}-{spec.digest()}.gguf"
        if not path.is_file():
            build_tiny_model(path, spec)
        paths[key] = path
    return paths
