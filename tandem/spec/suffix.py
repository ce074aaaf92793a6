"""Drafting from text seen before: this request's prompt and output, and a suffix cache of earlier requests.

Agents, code assistants and regenerated chats repeat themselves across requests: the same files, the same tool-call
JSON, the previous answer with one change. The cache keeps earlier requests' prompts and outputs (token ids) and
finds where the newest tokens of a sequence occurred before; the tokens that followed there are the draft. As in
SuffixDecoding (Arctic Inference), the match's length says how far to trust it: every earlier occurrence that
matches as long a suffix votes on each next token, the draft stops where the vote falls below MIN_PROB, and a
match of L tokens drafts at most about L tokens (the policy learns each match length's acceptance apart, see
LookupDrafter.bucket).

No model runs: a lookup is a dict access and a few slice comparisons. Memory is bounded: the oldest requests are
dropped first. Scopes keep clients apart (a reply's speed would otherwise tell one client what another generated).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from tandem.spec.drafters import Drafter
from tandem.spec.ngram import NgramDrafter
from tandem.spec.processors import NONE, Processors
from tandem.spec.sampling import SamplingParams
from tandem.spec.verify import EMPTY, DraftProposal

KEY = 6
"""Tokens of a cache key: the cache finds matches of at least this many tokens (this request's own text is
looked up from 2 tokens, tandem.spec.ngram)."""
MAX_DEPTH = 64
"""Longest match measured: longer matches count as this long (they are all near-certain repeats)."""
OCCURRENCES = 32
"""Most recent occurrences kept per key: a common key (a chat template's turn header) keeps its newest ones."""
MIN_PROB = 0.1
"""A draft stops where the vote for its next token, times the votes before it, falls below this."""
SPEC_FACTOR = 1.0
"""A match of L tokens drafts at most ceil(SPEC_FACTOR * L) tokens (Arctic Inference's max_spec_factor)."""
BYTES_PER_TOKEN = 400
"""Memory one cached token costs (its id in the request's list and its index entry), measured with tracemalloc in
tests/test_suffix.py; the cache's size limit counts tokens at this price."""
DEFAULT_MIB = 64
"""--suffix-cache-mib's default: about 170,000 tokens, a few hundred agent turns; small beside any model."""


@dataclass(frozen=True)
class Match:
    """Where the newest tokens of a sequence occurred before."""

    size: int
    """Tokens matched (at most MAX_DEPTH)."""
    source: str
    """"ngram" (this request's own prompt and output) or "cache" (an earlier request's)."""


class SuffixCache:
    """Earlier requests' token sequences, indexed by their KEY-token windows, in scopes; bounded in memory.

    Not thread-safe: one engine thread generates and remembers (the /health figures are read as plain ints)."""

    def __init__(self, max_bytes: int = DEFAULT_MIB << 20):
        self.max_tokens = max(0, max_bytes // BYTES_PER_TOKEN)
        self._docs: OrderedDict[int, tuple[int, list[int]]] = OrderedDict()  # id -> (scope id, tokens), oldest first
        self._index: dict[int, list[int]] = {}  # hash(scope id, window) -> occurrences (doc id << 32 | end), oldest first
        self._scopes: dict[str, int] = {}
        self._next_id = 0
        self.tokens = 0
        """Tokens held."""
        self.lookups = 0
        """Lookups made (a drafting step of a sequence that may draft from the cache)."""
        self.hits = 0
        """Lookups that found an earlier request's text."""
        self.evicted = 0
        """Requests dropped to keep within the size limit."""

    @property
    def requests(self) -> int:
        return len(self._docs)

    @property
    def bytes(self) -> int:
        return self.tokens * BYTES_PER_TOKEN

    def snapshot(self) -> dict:
        """What /health shows."""
        return {"requests": self.requests, "tokens": self.tokens, "bytes": self.bytes,
                "max_bytes": self.max_tokens * BYTES_PER_TOKEN, "lookups": self.lookups, "hits": self.hits,
                "hit_rate": round(self.hits / self.lookups, 4) if self.lookups else 0.0, "evicted": self.evicted}

    def _scope(self, scope: str) -> int:
        return self._scopes.setdefault(scope, len(self._scopes))

    def remember(self, scope: str, tokens: Sequence[int]) -> None:
        """Keep a finished request's tokens (prompt and output) for later requests of `scope`. A request that
        extends a kept one of its scope (the next turn of a chat, the same request again) replaces it."""
        tokens = list(tokens)
        if len(tokens) <= KEY or len(tokens) > self.max_tokens:
            return
        sid = self._scope(scope)
        for doc_id, (s, old) in list(islice(reversed(self._docs.items()), 8)):  # the newest few
            if s == sid and len(old) <= len(tokens) and tokens[:len(old)] == old:
                self._drop(doc_id)
        while self._docs and self.tokens + len(tokens) > self.max_tokens:
            self._drop(next(iter(self._docs)))
            self.evicted += 1
        doc_id, self._next_id = self._next_id, self._next_id + 1
        self._docs[doc_id] = (sid, tokens)
        self.tokens += len(tokens)
        for end in range(KEY, len(tokens)):  # a window is kept once a token follows it
            occ = self._index.setdefault(hash((sid, *tokens[end - KEY:end])), [])
            occ.append(doc_id << 32 | end)
            if len(occ) > OCCURRENCES:
                del occ[0]

    def _drop(self, doc_id: int) -> None:
        sid, tokens = self._docs.pop(doc_id)
        self.tokens -= len(tokens)
        for end in range(KEY, len(tokens)):
            key = hash((sid, *tokens[end - KEY:end]))
            occ = self._index.get(key)
            if occ is None:
                continue
            occ[:] = [o for o in occ if o >> 32 != doc_id]
            if not occ:
                del self._index[key]

    def find(self, scope: str, history: Sequence[int]) -> tuple[int, list[tuple[list[int], int]]]:
        """(match size, [(tokens, end)]): the earlier occurrences of the longest suffix of history found (size 0
        and none when nothing of KEY tokens or more matches); `end` is where each one's continuation starts."""
        n = len(history)
        sid = self._scopes.get(scope)
        if sid is None or n < KEY:
            return 0, []
        self.lookups += 1
        occ = self._index.get(hash((sid, *history[n - KEY:])))
        if not occ:
            return 0, []
        best, found = 0, []
        for o in reversed(occ):
            doc = self._docs.get(o >> 32)
            if doc is None:
                continue
            tokens, end = doc[1], o & 0xFFFFFFFF
            size = match_length(tokens, end, history, n)
            if size < KEY or size < best:
                continue
            if size > best:
                best, found = size, []
            found.append((tokens, end))
        if found:
            self.hits += 1
        return best, found


def match_length(a: Sequence[int], a_end: int, b: Sequence[int], b_end: int, cap: int = MAX_DEPTH) -> int:
    """How many tokens a[..a_end] and b[..b_end] share at their ends (at most cap): doubling, then halving, slice
    comparisons (each a C loop), not a Python loop per token."""
    limit = min(a_end, b_end, cap)
    lo, hi = 0, 1
    while hi <= limit and a[a_end - hi:a_end] == b[b_end - hi:b_end]:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)  # a[..] and b[..] share lo tokens, not hi (or hi is past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[a_end - mid:a_end] == b[b_end - mid:b_end]:
            lo = mid
        else:
            hi = mid
    return lo


def vote(found: Sequence[tuple[Sequence[int], int]], max_tokens: int) -> list[int]:
    """The continuation the occurrences agree on: at each position the most frequent next token among those that
    agreed so far, while the product of the votes' shares stays at least MIN_PROB."""
    live, tokens, p = list(found), [], 1.0
    for d in range(max_tokens):
        nxt = Counter(t[e + d] for t, e in live if e + d < len(t))
        if not nxt:
            break
        tok, count = nxt.most_common(1)[0]
        p *= count / sum(nxt.values())
        if p < MIN_PROB:
            break
        tokens.append(tok)
        live = [(t, e) for t, e in live if e + d < len(t) and t[e + d] == tok]
    return tokens


BUCKETS = (2, 4, 8, 16, 32)
"""Match sizes from which a new acceptance record starts: a 40-token repeat and a 3-token coincidence are accepted
at very different rates, so the policy learns each range apart and drafts long only where long matches pay."""


class LookupDrafter:
    """Drafts from this request's own text (an n-gram index, tandem.spec.ngram) and, with a cache and a scope, from
    earlier requests' text (SuffixCache): the longer match wins, this request's own on a tie.

    `find()` is the match a step would draft from; `propose()` drafts it. One per sequence; the cache is shared."""

    name = "ngram"

    def __init__(self, cache: SuffixCache | None = None):
        self.cache = cache
        self.scope: str | None = None
        """The cache scope of the current request (None: this request's text only)."""
        self.local = NgramDrafter()
        self._found: tuple[int, int, Match | None, object] | None = None  # (len, last token, match, candidates)

    def bind(self, scope: str | None) -> None:
        """The cache scope the next generation reads and adds to (None: its own text only)."""
        self.scope = scope if self.cache is not None else None

    def reset(self, history: Sequence[int] | None = None) -> None:
        self.local.reset()
        self._found = None

    def prefill(self, history: Sequence[int]) -> None:
        self.local.update(history)

    def kv_cells(self, n_history: int) -> int:
        return 0

    def remember(self, history: Sequence[int]) -> None:
        """A generation ended: the cache keeps its prompt and output for later requests of its scope."""
        if self.cache is not None and self.scope is not None:
            self.cache.remember(self.scope, history)

    def find(self, history: Sequence[int]) -> Match | None:
        """The longest earlier occurrence of the newest tokens, in this request or the cache (None: none)."""
        n = len(history)
        tail = tuple(history[-MAX_DEPTH:])  # a step asks twice (to route, then to draft): look up once
        if self._found is not None and self._found[:2] == (n, tail):
            return self._found[2]
        self.local.update(history)
        match, candidates = None, None
        local = self.local.lookup(history)
        if local is not None:
            size = match_length(history, local[1], history, n)
            match, candidates = Match(size, "ngram"), local[1]
        if self.scope is not None and self.cache is not None:
            size, found = self.cache.find(self.scope, history)
            if found and (match is None or size > match.size):
                match, candidates = Match(size, "cache"), found
        self._found = (n, tail, match, candidates)
        return match

    def cap(self, match: Match) -> int:
        """Most tokens a match of this size drafts."""
        return max(1, math.ceil(SPEC_FACTOR * match.size))

    @staticmethod
    def bucket(match: Match) -> int:
        """The match-size range (BUCKETS) whose acceptance record a step with this match learns from."""
        return max((b for b in BUCKETS if b <= match.size), default=BUCKETS[0])

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams | None = None,
                rng: np.random.Generator | None = None, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        """Up to max_tokens tokens continuing `history` from its match (EMPTY without one)."""
        match = self.find(history)
        if match is None or max_tokens <= 0:
            return EMPTY
        k = min(max_tokens, self.cap(match))
        candidates = self._found[3]
        if match.source == "cache":
            return DraftProposal(vote(candidates, k))
        n, end = len(history), candidates
        tokens: list[int] = []
        for j in range(end, end + k):  # past the history's end it repeats itself (period n - end)
            tokens.append(history[j] if j < n else tokens[j - n])
        return DraftProposal(tokens)


class CombinedDrafter:
    """Text lookups first, then a draft model (or nothing): the lookups draft when they match at least `min_match`
    tokens, else the model does. generate() routes each step itself (tandem.spec.generate._Speculation), with a
    cost model and policy per lookup match range and one for the model: their costs differ about a thousandfold,
    and one shared cost model made `both` fall back to about 1.0x once it had seen both kinds of steps.

    The test is on the match's size, not on the proposal's length: the context a match rests on is what tells a
    repeat from chance."""

    def __init__(self, lookup: LookupDrafter, model: Drafter | None, *, min_match: int = 3, name: str | None = None,
                 model_key: str | None = None):
        """`model_key`: the key of the model part's cost model (default: "NAME/MODEL", apart from the model used
        alone; the model's own name where the lookups take only long repeats and the model keeps its record)."""
        self.lookup = lookup
        self.model = model
        self.min_match = min_match
        self.name = name or (f"ngram+{model.name}" if model is not None else lookup.name)
        self.model_key = model_key or (f"{self.name}/{model.name}" if model is not None else None)

    def bind(self, scope: str | None) -> None:
        self.lookup.bind(scope)

    def reset(self, history: Sequence[int] | None = None) -> None:
        self.lookup.reset(history)
        if self.model is not None:
            self.model.reset(history)

    def matches(self, history: Sequence[int]) -> bool:
        """Whether the lookups match at least min_match tokens of this history."""
        match = self.lookup.find(history)
        return match is not None and match.size >= self.min_match

    def prefill(self, history: Sequence[int]) -> None:
        self.lookup.prefill(history)
        if self.model is not None:
            self.model.prefill(history)

    def kv_cells(self, n_history: int) -> int:
        return self.model.kv_cells(n_history) if self.model is not None else 0

    def propose(self, history: Sequence[int], max_tokens: int, sp: SamplingParams,
                rng: np.random.Generator, p_min: float | None = None,
                processors: Processors = NONE) -> DraftProposal:
        """The lookups' proposal on a long enough match, else the model's (generate() routes through `lookup` and
        `model` instead, with a policy per part)."""
        if self.matches(history):
            return self.lookup.propose(history, max_tokens)
        if self.model is None:
            return EMPTY
        return self.model.propose(history, max_tokens, sp, rng, p_min=p_min, processors=processors)
