"""Speculative-decoding statistics for one generation, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counts and timings of one generation. Invariant: accepted + rejected + ignored == drafted."""

    drafted: int = 0
    """Draft tokens produced (offered for verification, or cut off by a stop before it)."""
    accepted: int = 0
    """Draft tokens the main model accepted and that became part of the output."""
    rejected: int = 0
    """Draft tokens the main model rejected: the first mismatch and every draft token after it."""
    ignored: int = 0
    """Draft tokens never used because generation stopped first (EOS, stop string, max_tokens, cancel)."""
    drafted_by_position: list[int] = field(default_factory=list)
    """Per draft position i (0-based): how many steps drafted a token there."""
    accepted_by_position: list[int] = field(default_factory=list)
    """Per draft position i: how many of those tokens were accepted."""
    drafted_by_source: dict[str, int] = field(default_factory=dict)
    """Draft tokens by where they came from: "grammar" (forced by a grammar), "cache" (earlier requests' text),
    "ngram" (this request's own text), "model" (the draft model). They add up to `drafted`."""
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    """Accepted (and used) draft tokens by source; they add up to `accepted`."""
    draft_steps: int = 0
    """Verification steps that carried at least one draft token."""
    plain_steps: int = 0
    """Steps that decoded without a draft (policy chose 0, or the draft was shorter than draft-min)."""
    guessed: int = 0
    """Exact mode: plain steps whose spare row carried an n-gram guess of the next token (not drafts: they are
    outside accepted + rejected + ignored == drafted)."""
    guesses_accepted: int = 0
    """Of those guesses, how many the main model confirmed: tokens gained at no cost."""
    prompt_tokens: int = 0
    """Tokens in the prompt."""
    cached_tokens: int = 0
    """Of those, tokens the main model's KV cache already held (the previous turn of the same chat): reused,
    not decoded again."""
    generated_tokens: int = 0
    """Tokens produced (emitted to the caller; the end-of-generation token is not counted)."""
    relocations: int = 0
    """Times the sequence dropped its KV cells and decoded its history again into the lowest free pages of a shared
    pool, where it had no room after its last page (tandem.spec.generate.sequence, step 2b)."""
    prompt_time: float = 0.0
    """Seconds to evaluate the prompt and sample the first token."""
    generation_time: float = 0.0
    """Seconds from the first token to the last."""
    stop_reason: str = ""
    """eos, stop (a stop string), length (max_tokens), context (context full), cancelled."""
    draft_model: str | None = None
    """The draft's name, or None when no draft was used."""
    draft_status: str | None = None
    """Why there is no draft when one was expected (set by --draft-optional fallbacks)."""

    # -- recording ---------------------------------------------------------------------------
    def record_step(self, n_drafted: int, n_accepted: int, *, guessed: int = 0,
                    sources: tuple[tuple[str, int, int], ...] = ()) -> None:
        """One verification step: n_drafted offered, the first n_accepted agreed with the main model; a plain
        step (n_drafted 0) may carry `guessed` spare-row guesses, of which n_accepted were right. `sources`:
        (source, drafted, accepted) of the step's drafts in order (default: all from the draft model)."""
        if n_drafted == 0:
            self.plain_steps += 1
            self.guessed += guessed
            self.guesses_accepted += n_accepted if guessed else 0
            return
        self.draft_steps += 1
        for source, d, a in sources or (("model", n_drafted, n_accepted),):
            if d:
                self.drafted_by_source[source] = self.drafted_by_source.get(source, 0) + d
                self.accepted_by_source[source] = self.accepted_by_source.get(source, 0) + a
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.rejected += n_drafted - n_accepted
        grow = n_drafted - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(n_drafted):
            self.drafted_by_position[i] += 1
        for i in range(n_accepted):
            self.accepted_by_position[i] += 1

    def unuse(self, n: int, source: str = "model") -> None:
        """n accepted draft tokens (of `source`) were not used because generation stopped: they count as ignored."""
        if n and source in self.accepted_by_source:
            self.accepted_by_source[source] -= n
        self.accepted -= n
        self.ignored += n

    def ignore(self, n: int, source: str = "model") -> None:
        """n drafted tokens were never verified because generation stopped."""
        self.drafted_by_source[source] = self.drafted_by_source.get(source, 0) + n
        self.drafted += n
        self.ignored += n

    # -- derived -----------------------------------------------------------------------------
    @property
    def time_to_first_token(self) -> float:
        return self.prompt_time

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token (the first comes from prompt evaluation)."""
        n = self.generated_tokens - 1
        return n / self.generation_time if n > 0 and self.generation_time > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per verification step that carried a draft."""
        return self.accepted / self.draft_steps if self.draft_steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    def identity_holds(self) -> bool:
        """accepted + rejected + ignored == drafted, and the counts by source add up to drafted and accepted."""
        return (self.accepted + self.rejected + self.ignored == self.drafted
                and sum(self.drafted_by_source.values()) == self.drafted
                and sum(self.accepted_by_source.values()) == self.accepted)

    def to_dict(self) -> dict:
        """LM Studio's stats names, plus Tandem's extras."""
        return {
            "tokens_per_second": round(self.tokens_per_second, 3),
            "time_to_first_token": round(self.time_to_first_token, 4),
            "generation_time": round(self.generation_time, 4),
            "stop_reason": self.stop_reason,
            "draft_model": self.draft_model,
            "total_draft_tokens_count": self.drafted,
            "accepted_draft_tokens_count": self.accepted,
            "rejected_draft_tokens_count": self.rejected,
            "ignored_draft_tokens_count": self.ignored,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position],
            "draft_tokens_by_source": dict(self.drafted_by_source),
            "accepted_draft_tokens_by_source": dict(self.accepted_by_source),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
            "draft_steps": self.draft_steps,
            "plain_steps": self.plain_steps,
            "guessed_tokens_count": self.guessed,
            "accepted_guessed_tokens_count": self.guesses_accepted,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            **({"relocations": self.relocations} if self.relocations else {}),
            **({"draft_status": self.draft_status} if self.draft_status else {}),
        }

    def timings(self) -> dict:
        """llama.cpp server's `timings` names."""
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": self.prompt_tokens - self.cached_tokens,
            "prompt_ms": round(self.prompt_time * 1000, 3),
            "predicted_n": self.generated_tokens,
            "predicted_ms": round(self.generation_time * 1000, 3),
            "predicted_per_second": round(self.tokens_per_second, 3),
            "draft_n": self.drafted,
            "draft_n_accepted": self.accepted,
        }
