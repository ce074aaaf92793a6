"""The speculative decode loop: draft, verify in one batch, roll back, emit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.llama import Context
from tandem.errors import BadInputError, ContextOverflowError
from tandem.spec.drafters import Drafter
from tandem.spec.sampling import SamplingParams, probs, sample
from tandem.spec.stats import SpecStats
from tandem.spec.text import TextAssembler
from tandem.spec.verify import EMPTY, uniforms_needed, verify


@dataclass(frozen=True)
class GenParams:
    """One generation's settings."""

    max_tokens: int = 256
    """Most tokens to generate."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Temperature, top-k, top-p, min-p, seed."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not part of the output."""
    draft_max: int = 8
    """Most draft tokens per verification step."""
    draft_min: int = 0
    """Drafts shorter than this are not verified (a plain step is taken instead)."""
    draft_p_min: float = 0.0
    """Drafting stops when the draft's top probability falls below this."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadInputError(f"max_tokens must be >= 1, got {self.max_tokens}", "ask for at least one token",
                                param="max_tokens")
        if self.draft_max < 0 or self.draft_min < 0:
            raise BadInputError("draft_max and draft_min must be >= 0", "use 0 to switch drafting off",
                                param="draft_max")
        if not 0.0 <= self.draft_p_min <= 1.0:
            raise BadInputError(f"draft_p_min must be in [0, 1], got {self.draft_p_min}", "use e.g. 0.5",
                                param="draft_p_min")


@dataclass(frozen=True)
class Token:
    """One generated token. `text` may be empty (a UTF-8 sequence or a possible stop string is pending)."""

    id: int
    text: str
    source: str  # "main" or "draft"


@dataclass(frozen=True)
class Done:
    """The last event: stats, and any text held back until the end."""

    stats: SpecStats
    tail: str = ""


class _Output:
    """Emits tokens and decides when generation stops (EOS, stop string, max_tokens)."""

    def __init__(self, ctx: Context, gp: GenParams, stats: SpecStats):
        self.model, self.gp, self.stats = ctx.model, gp, stats
        self.text = TextAssembler(gp.stop)
        self.done = False

    def finish(self, reason: str) -> None:
        self.done = True
        self.stats.stop_reason = reason

    def emit(self, tokens: Sequence[int], n_draft: int) -> Iterator[Token]:
        """Yield tokens (the first n_draft came from the draft) until a stop; count unused drafts as ignored."""
        used = 0
        for i, tok in enumerate(tokens):
            used = i + 1
            if self.model.is_eog(tok):
                self.finish("eos")
                break
            self.stats.generated_tokens += 1
            yield Token(tok, self.text.push(self.model.piece(tok)), "draft" if i < n_draft else "main")
            if self.text.stopped:
                self.finish("stop")
                break
            if self.stats.generated_tokens >= self.gp.max_tokens:
                self.finish("length")
                break
        if n_draft > used:
            self.stats.unuse(n_draft - used)

    @property
    def remaining(self) -> int:
        return self.gp.max_tokens - self.stats.generated_tokens


def _pick(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    return int(logits.argmax()) if sp.greedy else sample(probs(logits, sp), rng.random())


def generate(main: Context, prompt: Sequence[int], gp: GenParams, drafter: Drafter | None = None,
             cancel: Callable[[], bool] | None = None) -> Iterator[Token | Done]:
    """Generate from `prompt` with the main model, speculating with `drafter` when given.

    Output equals the main model's alone: token for token at T = 0, in distribution at T > 0.
    """
    if not prompt:
        raise BadInputError("the prompt is empty", "send at least one token of text")
    if len(prompt) >= main.n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but the context holds {main.n_ctx}",
            "shorten the prompt or start with a larger --ctx-size", param="messages", code="context_length_exceeded")
    stats = SpecStats(prompt_tokens=len(prompt), draft_model=drafter.name if drafter else None)
    out = _Output(main, gp, stats)
    rng = np.random.default_rng(gp.sampling.seed)
    t0 = time.perf_counter()
    # 1. Evaluate the prompt with the main model and choose the first token.
    main.rollback(0)
    history = [*prompt, _pick(main.decode(prompt, 0)[0], gp.sampling, rng)]
    if drafter is not None:
        drafter.reset()
    stats.prompt_time = time.perf_counter() - t0
    yield from out.emit(history[-1:], 0)
    while not out.done:
        n_past = len(history) - 1  # the main KV holds everything but the newest token
        # 2. Stop when asked to, or when the context has no room for the newest token.
        if cancel is not None and cancel():
            out.finish("cancelled")
            break
        if n_past + 1 > main.n_ctx:
            out.finish("context")
            break
        # 3. Draft, within what is left of max_tokens and of the context.
        k = min(gp.draft_max, out.remaining - 1, main.n_ctx - n_past - 1)
        proposal = drafter.propose(history, k, gp.sampling, rng, p_min=gp.draft_p_min) if drafter is not None and k > 0 else EMPTY
        if len(proposal.tokens) < max(gp.draft_min, 1):
            proposal = EMPTY
        # 4. Verify the newest token and the drafts in ONE llama_decode, then keep the agreed prefix.
        keep = n_past
        try:
            logits = main.decode([history[-1], *proposal.tokens], n_past, logits="all")
            result = verify(proposal, logits, gp.sampling, rng.random(uniforms_needed(len(proposal.tokens))))
            keep = n_past + 1 + result.accepted
        finally:
            # 5. Roll the main KV back past the rejected drafts (on error, past the whole step).
            main.rollback(keep)
        stats.record_step(len(proposal.tokens), result.accepted)
        # 6. Emit the accepted drafts and the main model's own token; stop early if needed.
        new = result.tokens(proposal)
        yield from out.emit(new, result.accepted)
        history.extend(new)
    stats.generation_time = time.perf_counter() - t0 - stats.prompt_time
    yield Done(stats, out.text.flush())
