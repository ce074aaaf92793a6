"""Which replica last served each prompt prefix: a bounded map from chained block hashes to replica ids.

Pure Python, owned by one router (no shared state). A prompt is cut into fixed-size character blocks; block
i's key hashes block i with block i-1's key, so a key stands for the whole text up to the end of its block.
A conversation's next turn repeats the previous turn's prompt, so its leading keys are found and name the
replica whose prefix cache holds that text.
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

    def insert(self, text: str, replica: str) -> None:
        """Record that `replica` now holds `text` in its prefix cache."""
        for key in self._chain(text):
            self._keys[key] = replica
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def forget(self, replica: str) -> None:
        """Drop a replica that died or was removed: its cache is gone."""
        for key in [k for k, r in self._keys.items() if r == replica]:
            del self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)
