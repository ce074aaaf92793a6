"""Prometheus metrics, in a registry owned by one app (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the route)

from tandem.spec.stats import SpecStats

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """All of the server's metrics. The engine thread records generations; the HTTP layer records requests."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tandem_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("tandem_request_duration_seconds",
                                          "Time from request arrival to the end of the response",
                                          ["endpoint"], buckets=_DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("tandem_time_to_first_token_seconds",
                              "Time from a generation's submission (queue wait included) to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.generations = Counter("tandem_generations", "Finished generations by stop reason",
                                   ["stop_reason"], registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens evaluated", registry=r)
        self.generated_tokens = Counter("tandem_generated_tokens", "Tokens generated", registry=r)
        self.prefix_queries = Counter("tandem_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                      "(vLLM's prefix_cache_queries)", registry=r)
        self.prefix_hits = Counter("tandem_prefix_cache_hits", "Prompt tokens the prefix cache held, not decoded "
                                   "again (vLLM's prefix_cache_hits)", registry=r)
        self.drafts = Counter("tandem_spec_drafts", "Verification steps that carried a draft", registry=r)
        self.draft_tokens = Counter("tandem_spec_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("tandem_spec_accepted_tokens", "Draft tokens accepted and used", registry=r)
        self.rejected = Counter("tandem_spec_rejected_tokens", "Draft tokens rejected by the main model",
                                registry=r)
        self.ignored = Counter("tandem_spec_ignored_tokens", "Draft tokens unused because generation stopped",
                               registry=r)
        self.accepted_by_pos = Counter("tandem_spec_accepted_tokens_per_pos",
                                       "Draft tokens accepted at each draft position (0-based)", ["position"],
                                       registry=r)
        self.drafted_by_pos = Counter("tandem_spec_draft_tokens_per_pos",
                                      "Draft tokens proposed at each draft position (0-based)", ["position"],
                                      registry=r)
        self.drafted_by_source = Counter("tandem_spec_draft_tokens_by_source", "Draft tokens proposed, by source: "
                                         "grammar (forced), cache (earlier requests' text), ngram (the request's own "
                                         "text), model (the draft model)", ["source"], registry=r)
        self.accepted_by_source = Counter("tandem_spec_accepted_tokens_by_source", "Draft tokens accepted and used, "
                                          "by source", ["source"], registry=r)
        self.guessed = Counter("tandem_spec_guessed_tokens", "Plain steps' spare-row n-gram guesses (exact mode)",
                               registry=r)
        self.guesses_accepted = Counter("tandem_spec_accepted_guessed_tokens",
                                        "Spare-row guesses the main model confirmed (tokens gained at no cost)",
                                        registry=r)
        self.queue_depth = Gauge("tandem_queue_depth", "Requests waiting for the engine (vLLM's num_requests_waiting)",
                                 registry=r)
        self.requests_running = Gauge("tandem_requests_running", "Requests generating now (vLLM's "
                                      "num_requests_running)", registry=r)
        self.step_sequences = Histogram("tandem_step_sequences", "Requests whose rows one batched decode step held "
                                        "(--parallel)", buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64), registry=r)
        self.kv_usage = Gauge("tandem_kv_cache_usage_ratio", "Share of the main model's KV cache cells in use, 0-1 "
                              "(vLLM's kv_cache_usage_perc)", registry=r)
        self.engine_ready = Gauge("tandem_engine_ready", "1 when the models are loaded and serving", registry=r)
        labels = ["model", "drafter"]
        self.policy_acceptance = Gauge("tandem_spec_policy_acceptance", "The draft policy's long-run estimate that "
                                       "a checked draft token is accepted, by sampling regime",
                                       [*labels, "regime"], registry=r)
        self.policy_verify = Gauge("tandem_spec_policy_verify_seconds", "The draft policy's measured seconds of "
                                   "a main-model decode of `rows` rows", [*labels, "rows"], registry=r)
        self.policy_draft = Gauge("tandem_spec_policy_draft_seconds", "The draft policy's measured seconds to "
                                  "draft `tokens` tokens", [*labels, "tokens"], registry=r)
        self.policy_streak = Gauge("tandem_spec_policy_plain_steps_since_draft", "Plain steps of the drafter's "
                                   "sequences since one of them last drafted", labels, registry=r)
        self.suffix: dict[str, dict | None] = {}
        """The latest suffix cache figures per main model path (replaced whole, as `policy`)."""
        self.policy: dict[str, dict[str, dict]] = {}
        """The latest report (tandem.runtime.Runtime.policy_report) per main model path; replaced whole, so any
        thread may read it."""

    def record_generation(self, stats: SpecStats, first_token_s: float | None) -> None:
        """Count one finished generation (called by the engine thread before it reports Done)."""
        self.generations.labels(stats.stop_reason or "unknown").inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.prefix_queries.inc(stats.prompt_tokens)
        self.prefix_hits.inc(stats.cached_tokens)
        self.drafts.inc(stats.draft_steps)
        self.draft_tokens.inc(stats.drafted)
        self.accepted.inc(stats.accepted)
        self.rejected.inc(stats.rejected)
        self.ignored.inc(stats.ignored)
        self.guessed.inc(stats.guessed)
        self.guesses_accepted.inc(stats.guesses_accepted)
        for source, n in stats.drafted_by_source.items():
            self.drafted_by_source.labels(source).inc(n)
        for source, n in stats.accepted_by_source.items():
            self.accepted_by_source.labels(source).inc(n)
        # Position counts are of verified drafts; accepted-then-unused ones stay counted here.
        for pos, (d, a) in enumerate(zip(stats.drafted_by_position, stats.accepted_by_position)):
            self.drafted_by_pos.labels(str(pos)).inc(d)
            self.accepted_by_pos.labels(str(pos)).inc(a)
        if first_token_s is not None:
            self.ttft.observe(first_token_s)

    def record_policy(self, model: str, report: dict[str, dict], suffix: dict | None = None) -> None:
        """Publish what the draft policy of main model `model` (its path) believes, and its suffix cache's figures
        (tandem.spec.suffix.SuffixCache.snapshot; None: no cache), called by the engine thread."""
        self.policy = {**self.policy, model: report}
        self.suffix = {**self.suffix, model: suffix}
        for drafter, snap in report.items():
            for regime, rate in snap["acceptance"].items():
                self.policy_acceptance.labels(model, drafter, regime).set(rate)
            for rows, seconds in snap["verify_seconds"].items():
                self.policy_verify.labels(model, drafter, str(rows)).set(seconds)
            for tokens, seconds in snap["draft_seconds"].items():
                self.policy_draft.labels(model, drafter, str(tokens)).set(seconds)
            self.policy_streak.labels(model, drafter).set(snap["plain_steps_since_draft"])

    def record_request(self, endpoint: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
