"""The suffix cache: drafts from earlier requests' text, scoped, bounded, lossless."""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from test_server_support import FIXED_DRAFTS, client, start, tiny_app

from tandem.config import ModelOptions, SpecOptions
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token
from tandem.spec.sampling import SamplingParams, probs
from tandem.spec.suffix import BYTES_PER_TOKEN, KEY, LookupDrafter, SuffixCache, match_length, vote


# -- pure: matching, voting, scopes, memory -------------------------------------------------------------------

def test_match_length_equals_a_token_by_token_count():
    rng = np.random.default_rng(0)
    for _ in range(500):
        a = list(rng.integers(0, 3, 80))
        b = list(rng.integers(0, 3, 80))
        ae, be = int(rng.integers(0, 81)), int(rng.integers(0, 81))
        slow = 0
        while slow < min(ae, be, 64) and a[ae - 1 - slow] == b[be - 1 - slow]:
            slow += 1
        assert match_length(a, ae, b, be) == slow


def test_vote_follows_the_majority_and_stops_where_it_splits():
    found = [([1, 2, 3, 4, 5], 2), ([9, 2, 3, 4, 6], 2), ([7, 2, 3, 4, 5], 2)]
    assert vote(found, 5) == [3, 4, 5]          # 5 outvotes 6 two to one
    split = [([0, 1, t], 2) for t in range(12)]  # twelve different next tokens: no token has a tenth of the vote
    assert vote(split, 3) == []


def test_a_second_request_finds_the_first_and_its_continuation():
    cache = SuffixCache()
    first = list(range(100, 140))
    cache.remember("", first)
    size, found = cache.find("", first[:20])
    assert size == 20 and vote(found, 8) == first[20:28]
    assert cache.find("", [5, 6, 7, 8, 9, 10, 11])[0] == 0  # never seen
    assert cache.snapshot()["hits"] == 1 and cache.snapshot()["lookups"] == 2


def test_scopes_do_not_see_each_other():
    cache = SuffixCache()
    cache.remember("key0", list(range(100, 140)))
    assert cache.find("key1", list(range(100, 120)))[0] == 0
    assert cache.find("key0", list(range(100, 120)))[0] == 20


def test_the_next_turn_of_a_chat_replaces_the_turn_it_extends():
    cache = SuffixCache()
    turn1 = list(range(100, 140))
    cache.remember("", turn1)
    cache.remember("", turn1 + list(range(500, 520)))
    assert cache.requests == 1 and cache.tokens == 60
    cache.remember("", turn1 + list(range(500, 520)))  # the same request again
    assert cache.requests == 1


def test_the_oldest_requests_go_first_and_the_bound_holds():
    cache = SuffixCache(max_bytes=1000 * BYTES_PER_TOKEN)
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(0, 50_000, 300)) for _ in range(20)]
    for doc in docs:
        cache.remember("", doc)
        assert cache.tokens <= 1000
    assert cache.requests == 3 and cache.evicted == 17
    assert cache.find("", docs[0][:50])[0] == 0       # evicted: its index entries went with it
    assert cache.find("", docs[-1][:50])[0] == 50
    assert sum(len(v) for v in cache._index.values()) == sum(len(d) - KEY for _, d in cache._docs.values())


def test_memory_per_token_is_within_the_price_the_limit_counts():
    """BYTES_PER_TOKEN is what the size limit charges a cached token: measure what one really costs."""
    rng = np.random.default_rng(2)
    docs = [[int(t) for t in rng.integers(0, 150_000, 2000)] for _ in range(10)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = SuffixCache()
    for doc in docs:
        cache.remember("", doc)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert cache.tokens == 20_000
    assert used <= cache.bytes, f"{used / cache.tokens:.0f} bytes a token, over the {BYTES_PER_TOKEN} counted"


def test_a_lookup_prefers_the_longer_match_and_this_request_on_a_tie():
    cache = SuffixCache()
    cache.remember("", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    d = LookupDrafter(cache)
    d.bind("")
    history = [50, 51, 3, 4, 5, 6, 7, 8, 9, 60, 7, 8, 9]  # this request: 7 8 9 (3); the cache: 3..9 (7)
    m = d.find(history)
    assert m.source == "ngram" and m.size == 3  # the cache's window ends ...8, 9 only after 3..9: not this suffix
    history = [50, 51, 60, 7, 8, 9, 3, 4, 5, 6, 7, 8, 9]
    m = d.find(history)
    assert m.source == "cache" and m.size == 7 and d.propose(history, 3).tokens == [10, 11, 12]
    d.bind(None)  # this request's own text only
    d.reset()
    assert d.find(history).source == "ngram"


# -- the real engine --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft="none", ctx_size=1024, threads=2, exact=True)
    return Runtime(opts, spec=SpecOptions(spec_type="ngram"), announce=lambda _s: None)


def _run(rt: Runtime, prompt: list[int], gp: GenParams, **kw) -> tuple[list[int], Done]:
    ids, done = [], None
    for ev in rt.generate(prompt, gp, **kw):
        if isinstance(ev, Token):
            ids.append(ev.id)
        elif isinstance(ev, Done):
            done = ev
    return ids, done


PROMPTS = ["Once upon a time there was a robot that", "def add(a, b):\n    return", "The quick brown fox"]


def test_greedy_output_with_the_cache_equals_plain_and_a_repeat_drafts_from_it(rt):
    """Requests run twice, interleaved: every answer equals plain decoding, and each repeat drafts from the cache
    (this request's own text has nothing yet: the tiny models do not repeat themselves)."""
    gp = GenParams(max_tokens=40, draft_policy="fixed", draft_max=8)
    plain = {p: _run(rt, rt.prompt(text=p, raw=True), gp, use_draft=False)[0] for p in PROMPTS}
    for rep in range(2):
        for p in PROMPTS:
            ids, done = _run(rt, rt.prompt(text=p, raw=True), gp)
            assert ids == plain[p]
            assert done.stats.identity_holds()
            by = done.stats.drafted_by_source
            if rep == 1:
                assert by.get("cache", 0) >= 30 and done.stats.accepted_by_source["cache"] >= 30, by
    assert rt.suffix.requests == len(PROMPTS) and rt.suffix.hits > 0


def test_another_scope_gets_no_cache_drafts(rt):
    gp = GenParams(max_tokens=30, draft_policy="fixed", draft_max=8, lookup_scope="alice")
    prompt = rt.prompt(text="A list of colours: red, green,", raw=True)
    _run(rt, prompt, gp)
    _, done = _run(rt, prompt, GenParams(max_tokens=30, draft_policy="fixed", draft_max=8, lookup_scope="bob"))
    assert "cache" not in done.stats.drafted_by_source
    _, done = _run(rt, prompt, gp)
    assert done.stats.drafted_by_source.get("cache", 0) > 0


def test_a_new_runtime_starts_with_an_empty_cache(rt, tiny):
    assert rt.suffix.tokens > 0
    fresh = Runtime(ModelOptions(model=str(tiny["main"]), draft="none", ctx_size=512, threads=1),
                    spec=SpecOptions(spec_type="ngram"), announce=lambda _s: None)
    assert fresh.suffix.tokens == 0 and fresh.suffix.requests == 0


def test_cache_off_and_per_request_keep_nothing(tiny):
    for scope in ("off", "request"):
        r = Runtime(ModelOptions(model=str(tiny["main"]), draft="none", ctx_size=512, threads=1),
                    spec=SpecOptions(spec_type="ngram", suffix_cache=scope), announce=lambda _s: None)
        assert r.suffix is None


def test_sampled_output_keeps_the_main_models_distribution_with_cache_drafts(rt):
    """T = 1, top-k 4, rejection sampling (seed_matches_plain False): the cache holds the prompt followed by its
    likeliest first token and an unlikely second one, so every run whose first token is that one gets the unlikely
    token drafted. The second token's frequencies must still be the main model's probabilities (an acceptance that
    favoured the draft would show it at far above its probability)."""
    sp = SamplingParams(temperature=1.0, top_k=4)
    prompt = rt.prompt(text="Once upon a time there was", raw=True)
    plain_first = _row(rt, prompt)
    t1 = int(np.argmax(plain_first))
    p2 = probs(_row(rt, [*prompt, t1]), sp)
    drafted = int(np.argsort(p2)[-4])  # the fourth of the top 4: the least likely token the filter keeps
    assert 0.0 < p2[drafted] < 0.2, p2[drafted]
    rt.suffix.remember("stat", [*prompt, t1, drafted, drafted, drafted])
    counts, n, cache_drafts = Counter(), 0, 0
    for seed in range(3000):
        gp = GenParams(max_tokens=3, sampling=SamplingParams(temperature=1.0, top_k=4, seed=seed),
                       seed_matches_plain=False, draft_policy="fixed", draft_max=1, lookup_scope="stat")
        ids, done = _run(rt, prompt, gp)
        if ids[0] == t1 and len(ids) >= 2:
            counts[ids[1]] += 1
            n += 1
            cache_drafts += done.stats.drafted_by_source.get("cache", 0)
    assert n > 300 and cache_drafts >= n * 0.9  # the unlikely token was drafted in (nearly) every such run
    freq = np.array([counts[t] for t in range(len(p2))], dtype=float) / n
    tv = 0.5 * np.abs(freq - p2).sum()
    assert tv < 3.0 * np.sqrt(4 / n), (tv, freq[drafted], p2[drafted])


def _row(rt: Runtime, tokens: list[int]) -> np.ndarray:
    """The main model's logits after `tokens` (a plain decode)."""
    gp = GenParams(max_tokens=1, logprobs=20)
    for ev in rt.generate(tokens, gp, use_draft=False):
        if isinstance(ev, Token):
            row = np.full(rt.main_model.n_vocab, -np.inf)
            for alt in ev.logprob.top:
                row[alt.token] = alt.logprob
            return row
    raise AssertionError("no token")


# -- the server: scopes by API key, stats and /health ----------------------------------------------------------

def test_the_server_scopes_the_cache_by_api_key(tiny):
    srv = start(tiny_app(tiny, api_key="key-a,key-b"))
    body = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 30, "temperature": 0,
            **FIXED_DRAFTS}
    try:
        def ask(key: str) -> dict:
            with client(srv, key=key) as c:
                r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        first = ask("key-a")
        again = ask("key-a")
        other = ask("key-b")
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert again["stats"]["draft_tokens_by_source"].get("cache", 0) > 0
        assert "cache" not in other["stats"]["draft_tokens_by_source"]
        for r in (first, again, other):
            s = r["stats"]
            assert sum(s["draft_tokens_by_source"].values()) == s["total_draft_tokens_count"]
            assert sum(s["accepted_draft_tokens_by_source"].values()) == s["accepted_draft_tokens_count"]
        with client(srv, key="key-a") as c:
            health = c.get("/health").json()
            scrape = c.get("/metrics").text
        cache = health["model"]["suffix_cache"]
        assert cache["requests"] == 2 and cache["hits"] >= 1 and 0 < cache["hit_rate"] <= 1
        assert 'tandem_spec_draft_tokens_by_source_total{source="cache"}' in scrape
    finally:
        srv.stop()


def test_a_server_always_under_load_learns_what_lookups_cost():
    """Lookups decode nothing, so their time is their own whatever else shares the step: a server that always runs
    several requests must still learn their cost (else its policy stayed at the cold start's one-token drafts)."""
    from tandem.spec.costs import CostModel
    from tandem.spec.generate import _Speculator
    from tandem.spec.steps import run
    cost = CostModel()
    for _ in range(cost.verify.trusted):
        for rows in (1, 2, 5, 9, 17):
            cost.observe_verify(rows, 0.05 + 0.01 * rows)
    lookup = LookupDrafter()
    spec = _Speculator(lookup, GenParams(draft_max=8), cost, load=lambda: 4)
    history = list(range(100, 160)) * 3
    rng = np.random.default_rng(0)
    for i in range(10):
        proposal = run(spec.propose(history[:120 + i], 8, rng))
        spec.verified(len(proposal.tokens), len(proposal.tokens), 0.1, rows=4 + len(proposal.tokens))
    assert cost.draft.known and cost.ready
    assert len(run(spec.propose(history[:140], 8, rng)).tokens) > 1  # past the cold start's single tokens
