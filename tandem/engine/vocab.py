"""Vocabulary facts and the draft/main compatibility check (pure: no llama.cpp calls here)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tandem.errors import IncompatibleDraftError

#: Vocab sizes may differ by this many (padding tokens), as llama.cpp's speculative example allows.
VOCAB_SIZE_TOLERANCE = 128


@dataclass(frozen=True)
class VocabInfo:
    """What a draft must share with its main model for token ids to mean the same text."""

    vocab_type: str
    """Tokenizer family: 'gpt2'/'bpe', 'llama'/'spm', ... (GGUF tokenizer.ggml.model or llama.cpp's enum)."""
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
