"""Which replica last served each prompt prefix: a bounded map from chained block hashes to replica ids.

Pure Python, owned by one router (no shared state). A prompt is cut into fixed-size character blocks; block
i's key hashes block i with block i-1's key, so a key stands for the whole text up to the end of its block.
A conversation's next turn repeats the previous turn's prompt, so its leading keys are found and name the
replica whose prefix cache holds that text. The last key of each prompt is marked, so that a next turn (which
contains a whole earlier prompt) can be told from a new conversation that only shares a system prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK_CHARS = 32


@dataclass
class PrefixIndex:
    """Longest-prefix lookup of the replica that served a prompt."""

    capacity: int = 200_000
    """Most block keys kept (least recently used dropped first)."""
    block_chars: int = BLOCK_CHARS
    """Characters per block; texts shorter than one block never match."""
    _keys: OrderedDict[int, str] = field(default_factory=OrderedDict)
    _ends: OrderedDict[int, str] = field(default_factory=OrderedDict)  # last key of each prompt -> its replica

    def _chain(self, text: str) -> list[int]:
        keys, prev = [], 0
        for i in range(0, len(text) - self.block_chars + 1, self.block_chars):
            prev = hash((prev, text[i:i + self.block_chars]))
            keys.append(prev)
        return keys

    def match(self, text: str) -> tuple[str | None, int]:
        """(replica holding the longest known prefix of `text`, its length in characters); (None, 0) if none."""
        best, n = None, 0
        for i, key in enumerate(self._chain(text)):
            replica = self._keys.get(key)
            if replica is None:
                break
            best, n = replica, (i + 1) * self.block_chars
        return best, n

    def continued(self, text: str) -> tuple[str | None, int]:
        """(replica that was sent the longest earlier prompt `text` starts with, whole, and its length in characters
        (to its last full block)); (None, 0) if text continues no earlier prompt: a conversation's next turn, as
        opposed to a new conversation that shares only a system prompt with others."""
        best, n = None, 0
        for i, key in enumerate(self._chain(text)):
            if key not in self._keys:
                break
            if key in self._ends:
                best, n = self._ends[key], (i + 1) * self.block_chars
        return best, n

    def insert(self, text: str, replica: str) -> None:
        """Record that `replica` now holds `text` in its prefix cache."""
        chain = self._chain(text)
        for key in chain:
            self._keys[key] = replica
            self._keys.move_to_end(key)
        if chain:
            self._ends[chain[-1]] = replica
            self._ends.move_to_end(chain[-1])
        for keys in (self._keys, self._ends):
            while len(keys) > self.capacity:
                keys.popitem(last=False)

    def forget(self, replica: str) -> None:
        """Drop a replica that died or was removed: its cache is gone."""
        for keys in (self._keys, self._ends):
            for key in [k for k, r in keys.items() if r == replica]:
                del keys[key]

    def __len__(self) -> int:
        return len(self._keys)
