"""Drafting across vocabularies: a draft model with another tokenizer reads and proposes text.

The main model's history (its token ids) becomes text, and the draft's tokenizer turns that text into the draft's ids;
the draft's proposal becomes text again, and the main model's tokenizer turns it into main ids, which the main model
verifies as it verifies any draft. Correctness never rests on the translation: a proposal is only a guess, verified
token by token (greedy: argmax equality; T > 0: the proposal is deterministic, so verification samples the main
model's own distribution and compares, tandem.spec.verify), so a badly aligned boundary costs acceptance, not text.

Two tokenizers cut the same text at different places, so a history is translated in chunks that end where both
agree to cut: after a special token (a chat template's turn markers) or a newline. The chunks already translated are
kept, and each step re-translates only the text since the last such boundary (a few tokens), which also keeps the
draft's KV cache valid up to there (tandem.spec.drafters.ModelDrafter rewinds to the longest prefix it still shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tandem.spec.processors import common_prefix


class Tokenizer(Protocol):
    """What translation needs of a model (tandem.engine.llama.Model has it)."""

    name: str
    bos: int
    add_bos: bool

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def piece(self, token: int) -> bytes:
        """The token's bytes as output text (special tokens render empty)."""

    def text_piece(self, token: int) -> bytes:
        """The token's bytes, special tokens rendered as their text (<|im_start|>)."""


def _utf8(data: bytes, *, final: bool) -> str:
    """Text of `data`; a UTF-8 sequence cut at the end (a token ending mid-character) is left out unless `final`."""
    if not final:
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):  # find a lead byte among the last 4 bytes
            b = data[-back]
            if b & 0xC0 == 0x80:  # continuation byte: keep looking for its lead byte
                continue
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            if need > back:
                cut = len(data) - back
            break
        data = data[:cut]
    return data.decode("utf-8", "replace")


class Translator:
    """Main ids -> draft ids (to_draft) and draft ids -> main ids (to_main) for one sequence, through text.

    Keeps the last history it translated in chunks (`_marks`: main and draft lengths at boundaries where both
    tokenizers cut), so that each step translates only the history's new tail."""

    def __init__(self, main: Tokenizer, draft: Tokenizer):
        self.main, self.draft = main, draft
        self._main: list[int] = []   # main ids translated
        self._draft: list[int] = []  # their translation, in draft ids
        self._marks: list[tuple[int, int]] = [(0, 0)]  # (main length, draft length) at chunk boundaries
        self._special: dict[int, bool] = {}
        self.kept = 0
        """How many leading draft ids of the last translation the one before it had too (the chunks it kept)."""

    def _boundary(self, token: int) -> bool:
        """Whether both tokenizers cut the text after this main token: a special token or a newline ends it."""
        hit = self._special.get(token)
        if hit is None:
            text = self.main.text_piece(token)
            hit = self._special[token] = text.endswith(b"\n") or (bool(text) and not self.main.piece(token))
        return hit

    def reset(self) -> None:
        self.kept = 0
        self._main.clear()
        self._draft.clear()
        del self._marks[1:]

    def to_draft(self, history: Sequence[int]) -> list[int]:
        """The draft's ids for the text of `history` (main ids); the draft's BOS first where its tokenizer adds one."""
        # 1. Keep the chunks the new history still starts with.
        n = common_prefix(self._main, history)
        while len(self._marks) > 1 and self._marks[-1][0] > n:
            self._marks.pop()
        m, d = self._marks[-1]
        del self._main[m:], self._draft[d:]
        self.kept = d
        if len(self._marks) == 1:  # nothing kept: the draft's BOS stands for the main's
            start = 1 if history and self.main.add_bos and history[0] == self.main.bos else 0
            self._main.extend(history[:start])
            if self.draft.add_bos and self.draft.bos >= 0:
                self._draft.append(self.draft.bos)
            self._marks.append((start, len(self._draft)))
            m = start
        # 2. Translate the rest chunk by chunk; the last chunk (no boundary after it yet) gets no mark.
        chunk: list[bytes] = []
        for i in range(m, len(history)):
            tok = history[i]
            chunk.append(self.main.text_piece(tok))
            if self._boundary(tok):
                self._draft += self._encode(b"".join(chunk), final=True)
                chunk.clear()
                self._main.extend(history[self._marks[-1][0]:i + 1])
                self._marks.append((i + 1, len(self._draft)))
        if chunk:
            self._draft += self._encode(b"".join(chunk), final=False)
            self._main.extend(history[self._marks[-1][0]:])
        return list(self._draft)

    def _encode(self, data: bytes, *, final: bool) -> list[int]:
        text = _utf8(data, final=final)
        return self.draft.tokenize(text, add_special=False, parse_special=True) if text else []

    def to_main(self, history: Sequence[int], draft_tokens: Sequence[int], limit: int) -> list[int]:
        """Main ids for the text the draft proposed after `history`, at most `limit` of them.

        The text is tokenized after the history's last token's text, so a main tokenizer that treats a fragment's
        start specially (SentencePiece's leading space) cuts it as it would in place; where that last token would
        merge with the proposal, the proposal is tokenized alone."""
        text = _utf8(b"".join(self.draft.text_piece(t) for t in draft_tokens), final=False)
        if not text:
            return []
        if history:
            last = history[-1]
            ids = self.main.tokenize(_utf8(self.main.text_piece(last), final=True) + text, add_special=False,
                                     parse_special=True)
            if ids and ids[0] == last:
                return ids[1:limit + 1]
        return self.main.tokenize(text, add_special=False, parse_special=True)[:limit]
