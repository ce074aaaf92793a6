"""Grammar-constrained generation on the real engine: the tiny models write random tokens, so whatever parses
does so because of the grammar; speculation (model, n-gram and forced drafts) must not change the output."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from typing import Literal

import numpy as np
import pytest
from pydantic import BaseModel, Field

from tandem.engine.llama import Context, ContextParams, Model
from tandem.errors import BadInputError
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.grammar import Grammar, GrammarProcessor, json_schema_processor
from tandem.spec.ngram import NgramDrafter
from tandem.spec.suffix import LookupDrafter
from tandem.spec.processors import Processors
from tandem.spec.sampling import SamplingParams

PARAMS = ContextParams(n_ctx=1024, n_batch=256, n_threads=1)  # steady under a shared CPU
GREEDY = SamplingParams(temperature=0.0)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    tags: list[str] = Field(max_length=3)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")
    kind: Literal["book", "pen", "cup"]
    price: float = Field(ge=0, le=1000)
    in_stock: bool


class Order(BaseModel):
    id: int = Field(ge=1, le=9999)
    items: list[Item] = Field(min_length=1, max_length=2)
    note: str | None = Field(max_length=10)


def _strict(model: type[BaseModel]) -> dict:
    """The schema as the openai client sends it for parse() (no additional properties), with every free string
    bounded: the tiny models would otherwise write one string to max_tokens."""
    schema = model.model_json_schema()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                node["additionalProperties"] = False
            if node.get("type") == "string" and not {"maxLength", "pattern", "enum"} & node.keys():
                node["maxLength"] = 8
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


SCHEMAS = {"person": (Person, "Ann is 31 and likes tea."), "order": (Order, "Order 7: two pens, 3 dollars each.")}
PROMPTS = ["Extract as JSON: ", "def f(x):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


@pytest.fixture(scope="module")
def drafters(tiny):
    return {"model": ModelDrafter(Context(Model(tiny["draft_close"]), PARAMS)), "ngram": NgramDrafter()}


def _run(main, prompt, gp, drafter=None):
    events = list(generate(main, prompt, gp, drafter))
    done = events[-1]
    assert isinstance(done, Done) and done.stats.identity_holds(), done.stats
    toks = [e for e in events if isinstance(e, Token)]
    return toks, done, "".join(t.text for t in toks) + done.tail


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_output_validates_and_speculation_does_not_change_it(main, drafters, name):
    """Greedy output under a schema: the same tokens plain, with forced drafts, with a model or n-gram draft;
    it parses and validates, and the unconstrained output does not."""
    model, text = SCHEMAS[name]
    grammar = Grammar.json_schema(_strict(model))
    prompt = main.model.tokenize(f"Extract as JSON: {text}\n")
    plain, done, out = _run(main, prompt, GenParams(max_tokens=300, sampling=GREEDY, grammar=grammar,
                                                    forced_drafts=False))
    assert done.stats.drafted == 0 and done.stats.stop_reason == "eos", out
    model.model_validate_json(out)
    free = _run(main, prompt, GenParams(max_tokens=40, sampling=GREEDY))[2]
    with pytest.raises(ValueError):
        model.model_validate_json(free)
    forced, done, _ = _run(main, prompt, GenParams(max_tokens=300, sampling=GREEDY, grammar=grammar))
    assert [t.id for t in forced] == [t.id for t in plain]
    assert done.stats.accepted > 0 and any(t.source == "grammar" for t in forced)  # forced tokens were drafted
    for kind, drafter in drafters.items():
        gp = GenParams(max_tokens=300, sampling=GREEDY, grammar=grammar, draft_max=6, draft_policy="fixed")
        spec, done, _ = _run(main, prompt, gp, drafter)
        assert [t.id for t in spec] == [t.id for t in plain], kind
        assert {t.source for t in spec} >= {"grammar", "main"}


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_grammar_is_lossless_under_speculation_on_free_text(main, drafters, kind):
    """A grammar that leaves much open (lowercase words): drafts are often refused by the grammar or the main
    model, so the matcher rolls back often; the output is still plain greedy's, token for token."""
    grammar = Grammar.gbnf('root ::= word (" " word)* "."\nword ::= [a-z]+')
    for text in PROMPTS:
        prompt = main.model.tokenize(text)
        plain, _, out = _run(main, prompt, GenParams(max_tokens=60, sampling=GREEDY, grammar=grammar))
        assert out and set(out) <= set("abcdefghijklmnopqrstuvwxyz ."), out
        gp = GenParams(max_tokens=60, sampling=GREEDY, grammar=grammar, draft_max=5, draft_policy="fixed")
        spec, done, _ = _run(main, prompt, gp, drafters[kind])
        assert [t.id for t in spec] == [t.id for t in plain], text
        if kind == "model":
            assert done.stats.rejected > 0  # rollbacks happened


def test_t1_outcome_frequencies_agree_with_and_without_draft(main, drafters):
    """At T = 1 under a grammar, neither the draft (rejection sampling against its processed rows) nor the
    forced tokens (one-hot draft rows) change the distribution of the output."""
    grammar = Grammar.gbnf('root ::= ("yes" | "no" | "maybe" | "never") ", " ("red" | "green" | "blue" | "tea")')
    prompt = main.model.tokenize("Answer:")
    n = 500
    counts: dict[str, dict[str, int]] = {}
    accepted = rejected = 0
    for arm, drafter in (("plain", None), ("draft", drafters["model"])):
        seen: dict[str, int] = {}
        for seed in range(n):
            gp = GenParams(max_tokens=12, draft_max=3, draft_policy="fixed", grammar=grammar,
                           forced_drafts=arm == "draft", seed_matches_plain=False,
                           sampling=SamplingParams(temperature=1.0, top_k=8, seed=seed))
            _, done, out = _run(main, prompt, gp, drafter)
            seen[out] = seen.get(out, 0) + 1
            accepted += done.stats.accepted if drafter else 0
            rejected += done.stats.rejected if drafter else 0
        counts[arm] = seen
    assert accepted > n // 4 and rejected > n // 20
    _assert_same_distribution(counts["plain"], counts["draft"], n)


class _CountingNgram(LookupDrafter):
    """A lookup drafter that counts the tokens it proposes (all instances together)."""

    proposed = 0

    def propose(self, history, max_tokens, *args, **kwargs):
        proposal = super().propose(history, max_tokens, *args, **kwargs)
        _CountingNgram.proposed += len(proposal.tokens)
        return proposal


@pytest.fixture
def counting_ngram(monkeypatch):
    """The n-gram drafter generate() puts in front of a draft model under a grammar, counting its proposals."""
    import tandem.spec.generate as gen
    monkeypatch.setattr(gen, "LookupDrafter", _CountingNgram)
    _CountingNgram.proposed = 0
    return _CountingNgram


def test_grammar_with_a_draft_model_drafts_ngram_matches_first_and_stays_lossless(main, drafters, counting_ngram):
    """Extraction copies the prompt: under a grammar a draft model is preceded by n-gram drafting over the prompt
    and output (GenParams.grammar_ngram). Its drafts are verified like any: greedy output is plain greedy's."""
    grammar = Grammar.json_schema(_strict(Person))
    prompt = main.model.tokenize('Copy: {"name": "Ann", "age": 31, "tags": ["tea", "cat"]}\n'
                                 'Copy: {"name": "Ann", "age": 31, "tags": ["tea", "cat"]}\nCopy: ')
    plain, _, out = _run(main, prompt, GenParams(max_tokens=120, sampling=GREEDY, grammar=grammar,
                                                 forced_drafts=False))
    Person.model_validate_json(out)
    for policy in ("fixed", "adaptive"):
        counting_ngram.proposed = 0
        gp = GenParams(max_tokens=120, sampling=GREEDY, grammar=grammar, draft_max=6, draft_policy=policy,
                       spare_guess=False)
        spec, done, _ = _run(main, prompt, gp, drafters["model"])
        assert [t.id for t in spec] == [t.id for t in plain], policy
        assert counting_ngram.proposed > 0, policy
        assert done.stats.draft_model == drafters["model"].name
    counting_ngram.proposed = 0
    gp = GenParams(max_tokens=120, sampling=GREEDY, grammar=grammar, draft_max=6, draft_policy="fixed",
                   spare_guess=False, grammar_ngram=False)
    assert [t.id for t in _run(main, prompt, gp, drafters["model"])[0]] == [t.id for t in plain]
    assert counting_ngram.proposed == 0  # the draft model alone


def test_t1_frequencies_agree_with_ngram_drafts_under_a_grammar(main, drafters, counting_ngram):
    """At T = 1, n-gram drafts (no draft probabilities: sample and compare) ahead of the draft model under a
    grammar do not change the distribution of the output."""
    grammar = Grammar.gbnf('root ::= ("yes" | "no" | "maybe") ", " ("red" | "green" | "tea") "."')
    # Lines start as the output does (no space before the word): the n-gram matches at the choice of a colour.
    prompt = main.model.tokenize("maybe, green.\nyes, tea.\nno, green.\n")
    n = 400
    counts: dict[str, dict[str, int]] = {}
    for arm, drafter in (("plain", None), ("draft", drafters["model"])):
        seen: dict[str, int] = {}
        for seed in range(n):
            gp = GenParams(max_tokens=12, draft_max=3, draft_policy="fixed", grammar=grammar, spare_guess=False,
                           forced_drafts=arm == "draft", seed_matches_plain=False,
                           sampling=SamplingParams(temperature=1.0, top_k=8, seed=seed))
            out = _run(main, prompt, gp, drafter)[2]
            seen[out] = seen.get(out, 0) + 1
        counts[arm] = seen
    assert counting_ngram.proposed > n // 2
    _assert_same_distribution(counts["plain"], counts["draft"], n)


def test_processor_follows_any_history_forward_and_back(main):
    """After random forward steps and rollbacks, the mask is the one a fresh matcher gives for that history."""
    schema = _strict(Person)
    proc = json_schema_processor(main.model, schema)
    prompt = [1, 2, 3]
    proc.sync(prompt)
    rng = random.Random(0)
    hist = list(prompt)
    longest = rollbacks = 0
    for _ in range(60):
        if rng.random() < 0.3 and len(hist) > len(prompt):
            del hist[len(hist) - rng.randint(1, min(3, len(hist) - len(prompt))):]
            rollbacks += 1
        else:
            for _ in range(rng.randint(1, 3)):
                ok = np.flatnonzero(proc(hist, np.zeros(main.model.n_vocab, np.float32)) == 0)
                ok = [int(t) for t in ok if not main.model.is_eog(int(t))]
                if ok:
                    hist.append(rng.choice(ok))
        got = proc(hist, np.zeros(main.model.n_vocab, np.float32))
        fresh = json_schema_processor(main.model, schema)
        fresh.sync(prompt)
        assert np.array_equal(got, fresh(hist, np.zeros(main.model.n_vocab, np.float32)))
        longest = max(longest, len(hist) - len(prompt))
    assert rollbacks > 10 and longest > 15


def test_forced_tokens_and_admissible_drafts(main):
    """The forced tokens after `{` are the property name; a draft is cut at the first token the grammar refuses."""
    tok = main.model.tokenize
    proc = GrammarProcessor(main.model, Grammar.json_schema(_strict(Person)))
    prompt = tok("x")
    forced = proc.forced(prompt)
    assert main.model.detokenize(forced).startswith('{"name')
    good = tok('{"name": "Al", "age"', add_special=False)
    bad = tok('{"nome": 1', add_special=False)
    assert proc.admissible(prompt, good) == len(good)
    assert 0 < proc.admissible(prompt, bad) < len(bad)
    assert Processors((proc,)).admissible(prompt, bad) == proc.admissible(prompt, bad)


def test_a_schema_that_does_not_fit_ends_with_length_and_the_partial_text(main):
    prompt = main.model.tokenize("Extract:")
    _, done, out = _run(main, prompt, GenParams(max_tokens=8, sampling=GREEDY,
                                                grammar=Grammar.json_schema(_strict(Order))))
    assert done.stats.stop_reason == "length" and out.startswith('{"id": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.mark.parametrize("make", [
    lambda: Grammar.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}),
    lambda: Grammar.json_schema("{not json"),
    lambda: Grammar.json_schema([1, 2]),
    lambda: Grammar.gbnf('root ::= "yes | "no"'),
    lambda: Grammar.gbnf(""),
    lambda: Grammar.lark("start: missing_rule"),
])
def test_bad_grammars_are_bad_input(make):
    with pytest.raises(BadInputError) as e:
        make()
    assert e.value.param in ("response_format", "grammar") and e.value.fix


def test_lark_and_gbnf_text_both_compile():
    assert Grammar.gbnf('start: "a" | "b"').kind == "gbnf"  # Lark text through the GBNF entry
    assert Grammar.lark('start: "a" | "b"').kind == "lark"


def test_tandem_run_with_a_json_schema_and_a_grammar_file(tiny, tmp_path):
    schema, gbnf = tmp_path / "s.json", tmp_path / "g.gbnf"
    schema.write_text(json.dumps(_strict(Person)))
    gbnf.write_text('root ::= ("yes" | "no") "!"')

    def run(*args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "tandem", "run", "--model", str(tiny["main"]), "--draft", "none",
                            "--prompt", "Ann is 31.", "--temperature", "0", "--threads", "1", "--max-tokens", "120",
                            "--json", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    out = run("--json-schema", str(schema))
    Person.model_validate_json(out["text"])
    assert out["stats"]["accepted_draft_tokens_count"] == sum(t["source"] == "grammar" for t in out["tokens"]) > 0
    assert run("--grammar", str(gbnf))["text"] in ("yes!", "no!")


def test_bench_grammar_runs_every_configuration_and_finds_them_equal(tiny, tmp_path):
    prompts = tmp_path / "json_prompts.jsonl"
    prompts.write_text(json.dumps({"id": "person", "text": "Ann is 31.", "schema": _strict(Person)}) + "\n")
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "grammar", "--model", str(tiny["main"]), "--draft",
                        str(tiny["draft_close"]), "--prompts", str(prompts), "--max-tokens", "40", "--reps", "1",
                        "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"free", "json", "json+forced", "json+ngram", "json+model", "json+draft"}
    assert "| 1/1 |" in rows["json"]  # the constrained output is valid JSON with every required property
    assert ("constrained outputs equal across json, json+forced, json+ngram, json+model, json+draft: yes"
            in r.stdout)


def _assert_same_distribution(plain: dict, draft: dict, n: int) -> None:
    """The two arms' output counts (n samples each) agree: total variation within 4 sigma per cell."""
    keys = sorted(set(plain) | set(draft))
    assert len(keys) > 4
    a = np.array([plain.get(k, 0) for k in keys]) / n
    b = np.array([draft.get(k, 0) for k in keys]) / n
    pooled = (a + b) / 2
    bound = 0.5 * 4 * np.sqrt(2 * pooled * (1 - pooled) / n).sum()  # 4 sigma per cell, two samples
    assert 0.5 * np.abs(a - b).sum() < bound
