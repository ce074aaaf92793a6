"""Vocabulary facts and the draft/main compatibility check (pure: no llama.cpp calls here)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tandem.errors import IncompatibleDraftError

#: Vocab sizes may differ by this many (padding tokens), as llama.cpp's speculative example allows.
VOCAB_SIZE_TOLERANCE = 128

MIN_TEXT_SHARE = 0.5
"""A draft of another vocabulary drafts through text (tandem.spec.translate); it is refused when less than this share
of the main model's tokens can be written in its vocabulary: the rest of the main's text would reach the draft as
unknown tokens, and its drafts around them could not be right. Tokenizers with byte fallback write nearly everything
(SmolLM2's writes 99.9% of Qwen2.5's tokens: it lacks a few bytes that valid UTF-8 never or rarely uses)."""

TRANSLATABLE = ("bpe", "spm")
"""Vocabulary types whose token texts Tandem can read as text: GPT-2-style byte-level BPE and SentencePiece."""


@dataclass(frozen=True)
class VocabInfo:
    """What a draft must share with its main model for token ids to mean the same text."""

    vocab_type: str
    """Tokenizer family by llama.cpp's name: spm, bpe, wpm, ugm, rwkv, plamo2, none (GGUF names are mapped)."""
    n_tokens: int
    """Number of tokens in the vocabulary."""
    bos: int
    """Begin-of-sequence token id (-1 when none)."""
    eos: int
    """End-of-sequence token id (-1 when none)."""
    add_bos: bool
    """Whether tokenizing a prompt prepends BOS."""
    tokens: tuple[str, ...] = field(repr=False)
    """Token texts by id."""

    @property
    def fingerprint(self) -> str:
        """A short hash of everything the check compares, for indexes and listings."""
        h = hashlib.sha256(f"{self.vocab_type}|{self.bos}|{self.eos}|{self.add_bos}|".encode())
        h.update("\x00".join(self.tokens).encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]


_GGUF_TOKENIZERS = {"llama": "spm", "gpt2": "bpe", "bert": "wpm", "t5": "ugm", "rwkv": "rwkv", "plamo2": "plamo2",
                    "no_vocab": "none", "none": "none"}
"""GGUF tokenizer.ggml.model -> llama.cpp's vocabulary type name (what Model.vocab_info reports)."""
_LLAMA_DEFAULTS = {"spm": (1, 2, True), "bpe": (11, 11, False), "wpm": (101, -1, True), "ugm": (-1, 1, False)}
"""(BOS, EOS, add-BOS) llama.cpp assumes per vocabulary type when the GGUF keys are absent."""


def vocab_info_from_metadata(kv: Mapping[str, Any]) -> VocabInfo:
    """The VocabInfo llama.cpp would build from GGUF metadata (tokenizer.ggml.*), without loading the model.

    Uses llama.cpp's defaults for missing BOS/EOS/add-BOS keys; out-of-range ids keep the default, as
    llama.cpp does. Special cases llama.cpp derives from the BPE pre-tokenizer name (a few families add
    BOS without saying so in the file) are not modelled: Runtime still checks the loaded vocabularies.
    """
    model = str(kv.get("tokenizer.ggml.model", "none"))
    vtype = _GGUF_TOKENIZERS.get(model, model)
    tokens = kv.get("tokenizer.ggml.tokens")
    tokens = tuple(tokens) if isinstance(tokens, list | tuple) else ()
    bos, eos, add_bos = _LLAMA_DEFAULTS.get(vtype, (-1, -1, False))

    def token_id(key: str, default: int) -> int:
        v = kv.get(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens) else default

    bos, eos = token_id("tokenizer.ggml.bos_token_id", bos), token_id("tokenizer.ggml.eos_token_id", eos)
    flag = kv.get("tokenizer.ggml.add_bos_token")
    return VocabInfo(vtype, len(tokens), bos, eos, bool(flag) if isinstance(flag, bool) else add_bos, tokens)


def incompatibility(main: VocabInfo, draft: VocabInfo) -> str | None:
    """The first reason the draft cannot serve the main model, or None when it can."""
    if main.vocab_type != draft.vocab_type:
        return f"vocabulary type differs: main {main.vocab_type!r}, draft {draft.vocab_type!r}"
    if abs(main.n_tokens - draft.n_tokens) > VOCAB_SIZE_TOLERANCE:
        return (f"vocabulary size differs by more than {VOCAB_SIZE_TOLERANCE}: "
                f"main {main.n_tokens}, draft {draft.n_tokens}")
    if main.bos != draft.bos or main.eos != draft.eos:
        return f"special tokens differ: main BOS/EOS {main.bos}/{main.eos}, draft {draft.bos}/{draft.eos}"
    if main.add_bos != draft.add_bos:
        return f"add-BOS flag differs: main {main.add_bos}, draft {draft.add_bos}"
    for i, (a, b) in enumerate(zip(main.tokens, draft.tokens)):
        if a != b:
            return f"token {i} differs: main {a!r}, draft {b!r}"
    return None


@dataclass(frozen=True)
class Pairing:
    """How a draft can serve a main model: with the same token ids, through text, or not at all."""

    kind: str | None
    """"same" (one vocabulary), "translated" (another vocabulary, drafting through text) or None (unusable)."""
    text_share: float
    """Share of the main model's tokens the draft's vocabulary can write (1.0 for the same vocabulary)."""
    reason: str | None = None
    """Why the pair is unusable (kind None); for "translated", why the ids differ."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-ins for the 256 bytes (token texts are spelt in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTES = _byte_decoder()


def _token_bytes(vocab_type: str, token: str) -> bytes:
    """The bytes a token's text stands for (SentencePiece's byte tokens <0xNN> included)."""
    if vocab_type == "spm":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode("utf-8", "surrogatepass")
    return bytes(_BYTES.get(c, 0x3F) for c in token)


def _unwritable(v: VocabInfo) -> frozenset[int] | None:
    """Bytes the vocabulary has no token for, where it writes text byte by byte (byte-level BPE's alphabet,
    SentencePiece's byte fallback): any text without them can be written. None: it does not (then only the
    characters its tokens spell can be written)."""
    if v.vocab_type == "bpe":
        return frozenset(b for c, b in _BYTES.items() if c not in set(v.tokens))
    have = {t for t in v.tokens if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    return frozenset(b for b in range(256) if f"<0x{b:02X}>" not in have) if len(have) >= 128 else None


def text_share(main: VocabInfo, draft: VocabInfo) -> float:
    """Share of the main model's tokens whose text the draft's vocabulary can write without unknown tokens."""
    if main.vocab_type not in TRANSLATABLE or draft.vocab_type not in TRANSLATABLE:
        return 0.0
    texts = [_token_bytes(main.vocab_type, t) for t in main.tokens]
    missing = _unwritable(draft)
    if missing is not None:
        ok = sum(not missing.intersection(t) for t in texts)
    else:
        chars = set("".join(_token_bytes("spm", t).decode("utf-8", "ignore") for t in draft.tokens))
        ok = sum(set(t.decode("utf-8", "replace")) <= chars for t in texts)
    return ok / max(len(texts), 1)


def pairing(main: VocabInfo, draft: VocabInfo) -> Pairing:
    """Whether and how `draft` can draft for `main`."""
    same = incompatibility(main, draft)
    if same is None:
        return Pairing("same", 1.0)
    if main.vocab_type not in TRANSLATABLE or draft.vocab_type not in TRANSLATABLE:
        return Pairing(None, 0.0, f"{same}, and Tandem drafts through text only between BPE and SentencePiece "
                                  "tokenizers: no shared text encoding")
    share = text_share(main, draft)
    if share < MIN_TEXT_SHARE:
        return Pairing(None, share, f"{same}, and the draft's vocabulary can write only {share:.0%} of the main "
                                    f"model's tokens as text (at least {MIN_TEXT_SHARE:.0%} is needed to draft "
                                    "through text: no shared text encoding)")
    return Pairing("translated", share, same)


def check_pairing(main: VocabInfo, draft: VocabInfo, *, main_name: str = "main", draft_name: str = "draft") -> Pairing:
    """The pairing, or IncompatibleDraftError naming why the draft cannot serve the main model."""
    p = pairing(main, draft)
    if p.kind is None:
        raise IncompatibleDraftError(
            f"draft {draft_name} cannot be used with {main_name}: {p.reason}",
            "pick a draft whose tokenizer can write the main model's text (any byte-level BPE or SentencePiece model "
            "with byte fallback), best from the same family; `tandem models` lists the compatible drafts",
            param="draft_model", code="incompatible_draft")
    return p
