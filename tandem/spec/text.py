"""Turning token bytes into text safely: UTF-8 split across tokens, and stop strings split across tokens."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Feed token pieces (bytes); get back text that is safe to show, and whether a stop string matched.

    Text that could be the beginning of a stop string is held back until it is known not to be one.
    The concatenation of everything returned by push() and flush() is the final output text.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(piece)
        if not self._stop:
            self._pending = ""
            return text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        keep = self._held_suffix(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text
