"""Vocabulary facts and the draft/main compatibility check (pure: no llama.cpp calls here)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tandem.errors import IncompatibleDraftError

#: Vocab sizes may differ by this many (padding tokens), as llama.cpp's speculative example allows.
VOCAB_SIZE_TOLERANCE = 128


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


def check_compatible(main: VocabInfo, draft: VocabInfo, *, main_name: str = "main", draft_name: str = "draft") -> None:
    """Raise IncompatibleDraftError naming the first mismatch."""
    reason = incompatibility(main, draft)
    if reason is not None:
        raise IncompatibleDraftError(
            f"draft {draft_name} cannot be used with {main_name}: {reason}",
            "pick a draft from the same model family (same tokenizer), e.g. a smaller or more quantized "
            "variant; `tandem models` lists the compatible drafts",
            param="draft_model", code="incompatible_draft")
