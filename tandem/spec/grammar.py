"""Grammar-constrained generation: a JSON schema, GBNF or Lark grammar as a logits processor (llguidance).

Terms: a *grammar* is a constraint on the output text, compiled once per request and independent of any
model (`Grammar`); a *matcher* is llguidance's parser state over one generation's output tokens; the *mask*
of a position is the set of tokens the grammar allows there (the end-of-generation tokens only where the
output so far is complete). `GrammarProcessor` sets every other token's logit to -inf, so whatever the main
model or the draft samples parses.

The matcher follows the history it is given (tandem.spec.processors): tokens the history adds are consumed,
tokens it no longer has (rejected drafts) are rolled back. Only the output is parsed: the history at the
first call is taken as the prompt.

*Forced tokens* are the tokens llguidance finds the grammar forces next (JSON punctuation, property names of
a schema with required properties): generation proposes them as drafts that the main model verifies in the
same batch as any model or n-gram draft (tandem.spec.generate), so they cost a row of a decode each instead
of a decode each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from tandem.engine.llama import Model
from tandem.errors import BadInputError
from tandem.spec.processors import common_prefix

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How generated JSON is laid out: on one line, with a space after "," and ":" (as Python's json.dumps).
A fixed layout lets the grammar force the punctuation and the property names, which are then proposed as
drafts; flexible whitespace would leave every position between values open."""

FORCED_MAX = 32
"""Most forced tokens proposed in one verification step."""

_MASK_GATHER = 8
"""Masks allowing fewer than 1/_MASK_GATHER of the vocabulary are applied by copying the allowed logits into a
row of -inf (cheaper than writing -inf over most of the row)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint on the output text; model-independent, shared by any number of generations."""

    kind: str
    """json_schema, json_object, gbnf (GBNF or Lark text) or lark."""
    spec: str
    """The llguidance grammar (its JSON form), as LLMatcher takes it."""
    param: str = "response_format"
    """The request field the grammar came from, named by errors."""

    @classmethod
    def json_schema(cls, schema: dict | str, *, param: str = "response_format") -> Grammar:
        """Output that parses as JSON and validates against `schema` (a dict, or its JSON text)."""
        fix = "send a JSON Schema object, e.g. {\"type\": \"object\", \"properties\": {...}, \"required\": [...]}"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise BadInputError(f"the JSON schema is not valid JSON: {e}", fix, param=param) from e
        if not isinstance(schema, dict | bool):
            raise BadInputError(f"the JSON schema is a {type(schema).__name__}, not an object", fix, param=param)
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise BadInputError(f"the JSON schema cannot be used: {e}", fix, param=param) from e
        return cls._checked("json_schema", spec, param,
                            "use the JSON Schema keywords llguidance supports (type, properties, required, items, "
                            "enum, const, anyOf, $ref, pattern, minimum/maximum, minLength/maxLength, ...)")

    @classmethod
    def json_object(cls, *, param: str = "response_format") -> Grammar:
        """Any JSON object (response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"}, param=param)

    @classmethod
    def gbnf(cls, text: str, *, param: str = "grammar") -> Grammar:
        """A llama.cpp GBNF grammar (its root rule is `root`), or a Lark grammar (its root rule is `start`)."""
        fix = "send a GBNF grammar as llama.cpp takes it, e.g. root ::= \"yes\" | \"no\""
        if not isinstance(text, str) or not text.strip():
            raise BadInputError("the grammar is empty", fix, param=param)
        try:
            spec = llguidance.grammar_from("gbnf", text)
        except ValueError as e:
            raise BadInputError(f"the grammar does not compile: {e}", fix, param=param) from e
        return cls._checked("gbnf", spec, param, fix)

    @classmethod
    def lark(cls, text: str, *, param: str = "grammar") -> Grammar:
        """A Lark grammar in llguidance's dialect (its root rule is `start`)."""
        fix = "send a Lark grammar whose root rule is start, e.g. start: \"yes\" | \"no\""
        if not isinstance(text, str) or not text.strip():
            raise BadInputError("the grammar is empty", fix, param=param)
        return cls._checked("lark", llguidance.LLMatcher.grammar_from_lark(text), param, fix)

    @classmethod
    def _checked(cls, kind: str, spec: str, param: str, fix: str) -> Grammar:
        error = llguidance.LLMatcher.validate_grammar(spec)
        if error:
            raise BadInputError(f"the {kind.replace('_', ' ')} does not compile: {error}", fix, param=param)
        return cls(kind, spec, param)


def tokenizer(model: Model) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a model's vocabulary, its end-of-generation tokens as EOS (built once per
    model, about a second for a 50k vocabulary, and kept on the model)."""
    return model.grammar_tokenizer()


class GrammarProcessor:
    """A logits processor that allows only the tokens `grammar` allows after the output so far.

    One per generation. Each call costs the matcher work for the tokens the history added or dropped since
    the previous call, and one mask: O(new tokens), plus a C-level comparison of the output with what the
    matcher holds.
    """

    def __init__(self, model: Model, grammar: Grammar):
        self.grammar = grammar
        self.n_vocab = model.n_vocab
        self.eog = np.array(sorted(model.eog_tokens), dtype=np.int64)
        """End-of-generation tokens: the only tokens allowed once the history has left the grammar."""
        self.matcher = llguidance.LLMatcher(tokenizer(model), grammar.spec, log_level=0)
        if self.matcher.is_error():
            raise BadInputError(f"the {grammar.kind.replace('_', ' ')} does not compile for this model's "
                                f"vocabulary: {self.matcher.get_error()}", "simplify the grammar",
                                param=grammar.param)
        self._start: int | None = None  # prompt length: the history at the first call
        self._tokens: list[int] = []    # output tokens the matcher has consumed, in order
        self._off = 0                   # output tokens after _tokens that the grammar refused (0: none)
        self._bits = llnp.allocate_token_bitmask(1, self.n_vocab)

    # -- following the history -------------------------------------------------------------------
    def sync(self, history: Sequence[int]) -> None:
        """Make the matcher hold exactly the output part of `history`: roll back what differs, consume what is new."""
        if self._start is None:
            self._start = len(history)
        start, held = self._start, self._tokens
        if len(history) < start:
            raise ValueError(f"history of {len(history)} tokens is shorter than the prompt ({start})")
        n = len(held)
        same = n if history[start:start + n] == held else common_prefix(held, history[start:start + n])
        if same < n:
            self.matcher.rollback(n - same)
            del held[same:]
        new = list(history[start + same:])
        if not new:
            self._off = 0
            return
        took = self.matcher.try_consume_tokens(new) if not self.matcher.is_error() else 0
        held.extend(new[:took])
        self._off = len(new) - took

    @property
    def off_grammar(self) -> bool:
        """Whether the history holds tokens the grammar refused (then only end-of-generation is allowed)."""
        return self._off > 0 or self.matcher.is_error()

    # -- the LogitsProcessor hook --------------------------------------------------------------------
    def __call__(self, history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        self.sync(history)
        return self.apply(logits)

    def allowed(self) -> np.ndarray:
        """The mask after the history last synced to, as a bool row of n_vocab (never empty: end-of-generation
        tokens stand in when the grammar allows nothing)."""
        if self.off_grammar:
            ok = np.zeros(self.n_vocab, dtype=bool)
        else:
            llnp.fill_next_token_bitmask(self.matcher, self._bits)
            ok = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)
        if not ok.any():
            ok = ok.copy()
            ok[self.eog] = True
        return ok

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The row with every token the grammar refuses at -inf."""
        ok = self.allowed()
        if np.count_nonzero(ok) * _MASK_GATHER < self.n_vocab:
            idx = np.flatnonzero(ok)
            out = np.full_like(logits, -np.inf)
            out[idx] = logits[idx]
            return out
        np.copyto(logits, -np.inf, where=~ok)
        return logits

    # -- speculation ------------------------------------------------------------------------------
    def forced(self, history: Sequence[int]) -> list[int]:
        """The tokens the grammar forces after `history` (llguidance's fast-forward tokens: the canonical
        tokens of the bytes every continuation starts with, short of a last token that later bytes could
        merge into). The main model verifies them like any draft."""
        self.sync(history)
        if self.off_grammar or self.matcher.is_stopped():
            return []
        return self.matcher.compute_ff_tokens()[:FORCED_MAX]

    def admissible(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens` (proposed after `history`) the grammar allows, in order."""
        self.sync(history)
        if self.off_grammar or not tokens:
            return 0
        return int(self.matcher.validate_tokens(list(tokens)))


def json_schema_processor(model: Model, schema: dict | str, *, param: str = "response_format") -> GrammarProcessor:
    """A fresh processor (one generation) constraining output to JSON that validates against `schema`."""
    return GrammarProcessor(model, Grammar.json_schema(schema, param=param))
