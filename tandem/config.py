"""One typed dataclass per concern. Each field's docstring is its CLI help (see tandem.cli.options)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import BadInputError
from tandem.spec.policy import POLICIES

SPEC_TYPES = ("draft-model", "ngram", "both")
"""Values of --spec-type."""
SUFFIX_CACHE_SCOPES = ("shared", "request", "off")
"""Values of --suffix-cache."""


@dataclass
class ModelOptions:
    """Which models to load and how."""

    model: str | None = None
    """Main model GGUF path (default: the embedded SmolLM2-135M pair)."""
    draft: str | None = None
    """Draft model GGUF path, or 'none' for no speculation (default: the embedded draft when --model is not given)."""
    ctx_size: int = 4096
    """Main model context size in tokens."""
    ctx_size_draft: int = 0
    """Draft model context size in tokens; 0 means the same as --ctx-size."""
    threads: int = 0
    """CPU threads; 0 means all cores."""
    parallel: int = 1
    """Requests decoded together, in one batch per step (continuous batching; `tandem serve`, where the default is
    4). --ctx-size counts the positions of all of them together, as llama-server's -c; see --kv-unified. Each has
    its own share of the draft context. 1 decodes one request at a time."""
    kv_unified: bool = True
    """With --parallel N: every request may use up to --ctx-size positions, all taking KV pages from one pool
    while the others leave room (llama-server's --kv-unified, its default with automatic slots); a prompt waits
    for its cells, idle conversations' cached prefixes are dropped first, a request with free pages only below its
    own moves into them (its positions decoded again), and a request that finds no room in the whole pool ends
    with finish_reason length. --no-kv-unified reserves each request --ctx-size / N positions instead."""
    cache_type_k: str = "f16"
    """Main model KV cache type for K: f16, f32, q8_0, q4_0. f16 halves f32's memory, and a verification batch's
    attention then runs through llama.cpp's tinyBLAS, so it slows far less with a long context (default pair,
    last 500 of 2,000 tokens: +0.8 ms per token over tokens 100-300, against +3.1 with f32). With f16 a lone
    row's attention takes a batch's kernels too, so exact decoding costs nothing (an f32 cache needs pairing)."""
    cache_type_v: str = "f16"
    """Main model KV cache type for V."""
    cache_type_k_draft: str = "f16"
    """Draft model KV cache type for K."""
    cache_type_v_draft: str = "f16"
    """Draft model KV cache type for V."""
    memory_limit: str | None = None
    """Memory the models may use, in bytes or with a K/M/G suffix (e.g. 512M, 2G); overrides the available
    RAM in the memory plan (see `tandem fit`)."""
    exact: bool | None = None
    """Decode the main model so that a token's logits never depend on how many tokens share its batch: output
    with a draft, n-gram or cache drafts, alone or among other requests, is then bit for bit the output without
    them. On by default where it costs nothing: with Tandem's llama.cpp patch a lone row takes the kernels of a
    batch (a lone row costs 1.01x llama.cpp's own on Q4_K_M weights, 1.03x on Q8_0, 0.97x on F32, 1.2x on F16),
    and the repacked Q4_K kernels add in the same order for every row count. --exact insists: where the probe at
    load finds lone rows still differ (an f32 KV cache, a stock library), lone tokens go with the token before
    them, at the price of plain steps that decode two rows (1.2-2x a lone row). --no-exact decodes lone rows with
    llama.cpp's one-row kernels, which round differently. /health's model.invariance says which regime holds and
    why (regime: kernels, paired or none)."""
    chat_template: str | None = None
    """Chat template: a built-in name (chatml, gemma, llama3, llama2, mistral, phi3) or a jinja2 file. Default: the
    model's own (GGUF tokenizer.chat_template), else its family's, picked from its architecture with a warning."""
    draft_optional: bool = False
    """When the draft cannot be used (missing, not GGUF, incompatible, does not fit, fails to load), run
    without it instead of failing: /health says 'degraded' and every response's stats carry draft_status."""


SERVE_PARALLEL = 4
"""--parallel's default for `tandem serve` (LM Studio's "Max Concurrent Predictions" and llama-server's automatic
slots are 4 too); one-shot commands decode one request."""


@dataclass
class SpecOptions:
    """Speculative decoding knobs (defaults; requests may override them)."""

    draft_max: int = 16
    """Most tokens drafted per verification step (the adaptive policy picks fewer when that pays more)."""
    draft_min: int = 0
    """Drafts shorter than this are not verified."""
    draft_p_min: float = 0.0
    """Stop drafting when the draft's top probability falls below this. 0 by default: with a quantized twin
    of the main model as draft, tokens it is unsure of are still accepted 0.9 of the time, and cutting the
    draft there cost the default pair 0.88x vs 1.43x (draft-p-min 0.5 vs 0, side by side); the adaptive
    policy bounds the draft length instead."""
    draft_policy: str = "adaptive"
    """adaptive: each step draft the number of tokens (0 included) with the most expected tokens per second,
    from measured draft and verify costs and the running acceptance; fixed: always draft up to --draft-max."""
    spare_guess: bool = True
    """Where exact decoding pairs lone rows (regime "paired" on /health) a plain step decodes two rows;
    fill the second with an n-gram guess of the next token instead of the previous token again. The same
    cost and the same output; a right guess is one more token. --no-spare-guess repeats the previous token."""
    pause_slow_draft: bool = True
    """When even full acceptance would give less than 1.3x plain decoding on this machine (costs timed at load), too
    little to pay for rejected tokens, requests that do not name the draft decode as --draft none does, and /health
    says why (draft_paused). --exact, or
    --no-pause-slow-draft, keeps the draft on."""
    spec_type: str = "draft-model"
    """What drafts: draft-model (the --draft model; repeats of earlier text of 8+ tokens are drafted from the text,
    see --suffix-cache), ngram (lookups of earlier text only, no draft model needed), or both (a match of 3+ tokens,
    else the draft model). Where the draft model is paused or absent, lookups of 3+ tokens still draft."""
    suffix_cache: str = "shared"
    """Which earlier text drafts may come from, besides a draft model: shared (this request's prompt and output, and
    earlier requests' of the same API key, or of all requests when the server has no key), request (this request's
    own text only), off (no lookups unless --spec-type ngram or both asks, and then of the request's own text).
    Output never changes: drafts are verified as always."""
    suffix_cache_mib: int = 64
    """Memory the cache of earlier requests' text may use; the oldest requests are dropped first."""

    def __post_init__(self) -> None:
        if self.draft_policy not in POLICIES:
            raise BadInputError(f"--draft-policy must be one of {', '.join(POLICIES)}, got {self.draft_policy!r}",
                                "use adaptive or fixed", param="draft_policy")
        if self.spec_type not in SPEC_TYPES:
            raise BadInputError(f"--spec-type must be one of {', '.join(SPEC_TYPES)}, got {self.spec_type!r}",
                                "use draft-model, ngram or both", param="spec_type")
        if self.suffix_cache not in SUFFIX_CACHE_SCOPES:
            raise BadInputError(f"--suffix-cache must be one of {', '.join(SUFFIX_CACHE_SCOPES)}, got "
                                f"{self.suffix_cache!r}", "use shared, request or off", param="suffix_cache")
        if self.suffix_cache_mib < 0:
            raise BadInputError(f"--suffix-cache-mib must be >= 0, got {self.suffix_cache_mib}",
                                "use 0 to keep no earlier requests", param="suffix_cache_mib")


@dataclass
class SamplingOptions:
    """How tokens are chosen."""

    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_k: int = 0
    """Top-k filter; 0 is off."""
    top_p: float = 1.0
    """Top-p (nucleus) filter; 1 is off."""
    min_p: float = 0.0
    """Min-p filter; 0 is off."""
    seed: int | None = None
    """Random seed for reproducible sampling."""


@dataclass
class PenaltyOptions:
    """Penalties on repeated tokens (tandem.spec.penalties)."""

    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far, -2 to 2 (OpenAI's); 0 is off."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far, -2 to 2 (OpenAI's); 0 is off."""
    repeat_penalty: float = 1.0
    """llama.cpp's: the logits of tokens among the last --repeat-last-n (prompt included) are divided by it when
    positive, multiplied when negative; 1 is off, e.g. 1.1 discourages repeats."""
    repeat_last_n: int = 64
    """The tokens --repeat-penalty looks back over; 0 is off, -1 the whole history."""


@dataclass
class RegistryOptions:
    """Where models are found and per-model defaults are kept."""

    models_dir: str | None = None
    """Folder scanned (recursively) for *.gguf models (default: $TANDEM_MODELS_DIR, else models/ under the user
    data folder, e.g. ~/.local/share/tandem/models)."""
    config: str | None = None
    """Per-model defaults file (default: $TANDEM_CONFIG, else ~/.config/tandem/models.toml)."""
