"""Penalties and biases as logits processors: OpenAI's presence and frequency penalties and logit_bias, and
llama.cpp's repeat penalty.

Terms: the *output* of a history is its part after the prompt: the tokens generated so far and, inside a
verification batch, the draft tokens before the position (they are counted as plain decoding counts them once it
has generated them). count[j] is how many times token j occurs in the output. The *window* is the last
repeat_last_n tokens of the history, prompt included, as llama.cpp's penalty_last_n.

Each row is changed in this order (llama.cpp's and vLLM's: the bias first, then the penalties):
    logit[j] += bias[j]
    logit[j] /= repeat_penalty if logit[j] > 0, else *= repeat_penalty      for each distinct j in the window
    logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty
Each is a pure function of (history, row): a position gets the same row whether plain decoding reaches it or a
verification batch does, which is what keeps speculation lossless under them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tandem.errors import BadInputError
from tandem.spec.processors import LogitsProcessor

PENALTY_RANGE = (-2.0, 2.0)
"""OpenAI's range for presence_penalty and frequency_penalty."""
BIAS_RANGE = (-100.0, 100.0)
"""OpenAI's range for a logit_bias value."""
DEFAULT_REPEAT_LAST_N = 64
"""llama.cpp's default window for the repeat penalty."""


def _check_range(name: str, value: float, lo: float, hi: float, fix: str) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise BadInputError(f"{name} must be between {lo:g} and {hi:g}, got {value}", fix, param=name)


@dataclass(frozen=True)
class Penalties:
    """Presence, frequency and repeat penalties for one generation."""

    presence: float = 0.0
    """presence_penalty: subtracted from the logit of every token the output holds (-2 to 2; 0: off)."""
    frequency: float = 0.0
    """frequency_penalty: subtracted once per occurrence of a token in the output (-2 to 2; 0: off)."""
    repeat: float = 1.0
    """repeat_penalty: positive logits of the tokens in the window are divided by it, negative ones multiplied
    (> 0; 1: off; above 1 discourages repeats)."""
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    """The window of the repeat penalty: the last this many tokens of the history, prompt included (0: off;
    -1: the whole history)."""
    n_prompt: int | None = None
    """Where the output starts in a history: the prompt's length, set by for_prompt() when a generation starts
    (sequence() does it); None until then."""

    def __post_init__(self) -> None:
        _check_range("presence_penalty", self.presence, *PENALTY_RANGE, "use 0 for no penalty, or up to 2")
        _check_range("frequency_penalty", self.frequency, *PENALTY_RANGE, "use 0 for no penalty, or up to 2")
        if not (math.isfinite(self.repeat) and self.repeat > 0):
            raise BadInputError(f"repeat_penalty must be > 0, got {self.repeat}",
                                "use 1 for no penalty, or e.g. 1.1 to discourage repeats", param="repeat_penalty")
        if self.repeat_last_n < -1:
            raise BadInputError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}",
                                "use e.g. 64 (the default), 0 for no repeat penalty, -1 for the whole history",
                                param="repeat_last_n")

    @property
    def active(self) -> bool:
        """Whether any penalty changes a row."""
        return bool(self.presence or self.frequency or (self.repeat != 1.0 and self.repeat_last_n != 0))

    def for_prompt(self, prompt: Sequence[int], n_vocab: int) -> Penalties:
        """The penalties of a generation from `prompt`: the output starts after it."""
        return replace(self, n_prompt=len(prompt))

    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if self.n_prompt is None:
            raise RuntimeError("Penalties used before for_prompt(): the prompt's length is not known")
        n_vocab = logits.size  # a draft row may be shorter than the main model's; its missing tokens are skipped
        if self.repeat != 1.0 and self.repeat_last_n != 0:
            window = history if self.repeat_last_n < 0 else history[-self.repeat_last_n:]
            ids = np.unique(np.asarray(window, dtype=np.int64))
            ids = ids[ids < n_vocab]
            x = logits[ids]
            logits[ids] = np.where(x > 0, x / self.repeat, x * self.repeat)
        if (self.presence or self.frequency) and len(history) > self.n_prompt:
            ids, counts = np.unique(np.asarray(history[self.n_prompt:], dtype=np.int64), return_counts=True)
            keep = ids < n_vocab
            logits[ids[keep]] -= counts[keep] * self.frequency + self.presence
        return logits


@dataclass(frozen=True)
class LogitBias:
    """Values added to some tokens' logits (OpenAI's logit_bias)."""

    bias: tuple[tuple[int, float], ...]
    """(token id, value), each id once, values from -100 (about a ban) to 100 (about a forced choice)."""

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for token, value in self.bias:
            if token < 0 or token in seen:
                raise BadInputError(f"logit_bias: token id {token} is negative or given twice",
                                    "give each token id once, as a decimal string key", param="logit_bias")
            seen.add(token)
            if not (math.isfinite(value) and BIAS_RANGE[0] <= value <= BIAS_RANGE[1]):
                raise BadInputError(f"logit_bias: the bias of token {token} must be between -100 and 100, got {value}",
                                    "use -100 to ban a token, 100 to force it, values between to nudge it",
                                    param="logit_bias")

    @classmethod
    def parse(cls, mapping: Mapping[str, object]) -> LogitBias:
        """From OpenAI's shape: {"token id": bias}, ids as decimal strings, biases numbers."""
        pairs: list[tuple[int, float]] = []
        for key, value in mapping.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise BadInputError(f"logit_bias: key {key!r} is not a token id",
                                    "use token ids as decimal strings, e.g. {\"50256\": -100}", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadInputError(f"logit_bias: the bias of token {key} is {type(value).__name__}, not a number",
                                    "use a number from -100 to 100", param="logit_bias")
            pairs.append((int(key), float(value)))
        return cls(tuple(pairs))

    def for_prompt(self, prompt: Sequence[int], n_vocab: int) -> LogitBias:
        """Check the ids against the main model's vocabulary (n_vocab tokens) when a generation starts."""
        bad = [token for token, _ in self.bias if token >= n_vocab]
        if bad:
            raise BadInputError(f"logit_bias: token id {bad[0]} is not in the model's vocabulary of {n_vocab} tokens",
                                f"use token ids below {n_vocab}", param="logit_bias")
        return self

    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        for token, value in self.bias:
            if token < logits.size:  # a draft row may be shorter than the main model's
                logits[token] += value
        return logits


def penalty_processors(*, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                       repeat_penalty: float = 1.0, repeat_last_n: int = DEFAULT_REPEAT_LAST_N,
                       logit_bias: Mapping[str, object] | None = None) -> tuple[LogitsProcessor, ...]:
    """The processors for these settings, in the order above: none when every one is off (no cost)."""
    chain: list[LogitsProcessor] = []
    if logit_bias:
        chain.append(LogitBias.parse(logit_bias))
    penalties = Penalties(presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n)
    if penalties.active:
        chain.append(penalties)
    return tuple(chain)
