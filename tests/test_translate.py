"""Drafting across vocabularies (tandem.spec.translate) on the tiny fixtures: `other_vocab` is the main model's weights
under another tokenizer (SmolLM2's first 32k tokens, renumbered), `different_vocab` a WordPiece vocabulary that
shares no text encoding with the main model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tandem.config import ModelOptions, SpecOptions
from tandem.engine.llama import Context, ContextParams, Model
from tandem.engine.vocab import check_pairing, pairing
from tandem.errors import IncompatibleDraftError
from tandem.models.library import Library
from tandem.models.registry import Registry, RegistryConfig
from tandem.models.settings import SettingsFile
from tandem.prompts import dev_prompts
from tandem.runtime import Runtime
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token, generate
from tandem.spec.sampling import SamplingParams
from tandem.spec.translate import Translator

PARAMS = ContextParams(n_ctx=512, n_batch=128, n_threads=1)
PROMPTS = [*dev_prompts()[:6], "def fizzbuzz(n):", "The capital of France is", "<|im_start|>user\nHi<|im_end|>\n"]


@pytest.fixture(scope="module")
def main(tiny):
    return Context(Model(tiny["main"]), PARAMS)


@pytest.fixture(scope="module")
def other(tiny):
    return Model(tiny["other_vocab"])


@pytest.fixture
def drafter(main, other):
    return ModelDrafter(Context(other, PARAMS), translator=Translator(main.model, other))


def run(main, prompt, gp, drafter=None):
    events = list(generate(main, prompt, gp, drafter))
    done = events[-1]
    assert isinstance(done, Done) and done.stats.identity_holds(), done.stats
    return [e.id for e in events if isinstance(e, Token)], done


def test_the_fixture_pair_really_has_two_vocabularies(main, other):
    p = pairing(main.model.vocab_info(), other.vocab_info())
    assert p.kind == "translated" and p.text_share == 1.0 and "differs" in p.reason
    text = "The capital of France is Paris"
    assert main.model.tokenize(text) != other.tokenize(text)  # other ids (and a tokenizer that may cut otherwise)
    assert main.model.detokenize(main.model.tokenize(text)) == other.detokenize(other.tokenize(text)) == text


def test_a_translated_history_is_the_drafts_own_tokenization_step_by_step(main, other):
    """Translating a growing history chunk by chunk (and after a rewind) gives what the draft's tokenizer gives for the
    whole text, special tokens included."""
    m = main.model
    text = "<|im_start|>user\nWrite quicksort in Python.<|im_end|>\n<|im_start|>assistant\ndef quicksort(arr):\n  ok"
    history = m.tokenize(text)
    t = Translator(m, other)
    for n in [*range(1, len(history) + 1), 12, 5, len(history)]:  # grows one token at a time, then rewinds
        own = t.to_draft(history[:n])
        whole = other.tokenize(m.detokenize(history[:n]).replace("\ufffd", ""), add_special=False)
        specials = b"".join(m.text_piece(x) for x in history[:n]).decode("utf-8", "ignore")
        assert own == other.tokenize(specials, add_special=False) or own == whole, n
    assert other.text_piece(t.to_draft(history)[0]) == b"<|im_start|>"  # the chat markers are the draft's own tokens


def test_a_proposal_comes_back_in_main_ids(main, other):
    m = main.model
    t = Translator(m, other)
    history = m.tokenize("The capital of")
    proposal = other.tokenize(" France is Paris", add_special=False)
    assert t.to_main(history, proposal, 8) == m.tokenize(" France is Paris", add_special=False)
    assert t.to_main(history, proposal, 2) == m.tokenize(" France is Paris", add_special=False)[:2]
    assert t.to_main(history, [], 4) == []


def test_cross_vocabulary_greedy_output_equals_plain_greedy_output(main, drafter):
    gp = GenParams(max_tokens=48, draft_max=4, draft_policy="fixed")
    accepted = rejected = 0
    for text in PROMPTS:
        prompt = main.model.tokenize(text)
        plain, _ = run(main, prompt, gp)
        spec, done = run(main, prompt, gp, drafter)
        assert spec == plain, f"diverged on {text!r}"
        assert main.held(0)[:len(prompt) + len(spec) - 1] == prompt + spec[:-1]  # the main's KV rolled back right
        accepted += done.stats.accepted
        rejected += done.stats.rejected
        assert done.stats.draft_model == drafter.name and done.stats.drafted > 0
    assert accepted > 0 and rejected > 0  # both the accepted and the rejected paths ran


def test_rejection_in_the_middle_of_a_draft_token_rolls_the_draft_cache_back(main, other, drafter):
    """The main accepts part of a draft and then a token whose text ends inside a draft token: the draft's KV cache
    must hold exactly the new history's translation afterwards (what a fresh translation gives), never the text the
    main rejected."""
    m = main.model
    rng = np.random.default_rng(0)
    history = m.tokenize("The capital of France is")
    split = 0
    for _ in range(12):
        proposal = drafter.propose(history, 4, SamplingParams(), rng).tokens
        assert proposal
        j = int(rng.integers(len(proposal)))
        text = m.text_piece(proposal[j]).decode("utf-8", "ignore")
        cut = m.tokenize(text[:max(1, len(text) // 2)], add_special=False) if len(text) > 1 else []
        wrong = cut[0] if cut and cut[0] != proposal[j] else int(rng.integers(1000, 2000))
        split += wrong in cut
        history = [*history, *proposal[:j], wrong]
        drafter.propose(history, 2, SamplingParams(), rng)
        own = Translator(m, other).to_draft(history)
        held = drafter.ctx.held(0)
        assert held[:len(own)] == own
        assert len(held) <= len(own) + 1  # plus the draft's own first proposal (its last one is never decoded)
    assert split > 0  # some rejections really fell inside a draft token's text


def test_t1_token_frequencies_agree_with_and_without_a_cross_vocabulary_draft(main, drafter):
    """At T = 1 a translated (deterministic) draft must not change what is generated: the main model samples its own
    distribution and compares (tandem.spec.verify). Positions 2 and 3, rejection-sampling mode, fixed seeds."""
    n = 600
    sp = dict(temperature=1.0, top_k=4)
    prompt = main.model.tokenize("The capital of France is")
    counts = {}
    accepted = rejected = 0
    for arm, d in (("plain", None), ("draft", drafter)):
        pos = [{}, {}]
        for seed in range(n):
            gp = GenParams(max_tokens=3, draft_max=3, draft_policy="fixed", seed_matches_plain=False,
                           sampling=SamplingParams(seed=seed, **sp))
            toks, done = run(main, prompt, gp, d)
            for j in (0, 1):
                pos[j][toks[j + 1]] = pos[j].get(toks[j + 1], 0) + 1
            accepted += done.stats.accepted
            rejected += done.stats.rejected
        counts[arm] = pos
    assert accepted > n // 10 and rejected > n // 10
    for j in (0, 1):
        keys = sorted(set(counts["plain"][j]) | set(counts["draft"][j]))
        a = np.array([counts["plain"][j].get(k, 0) for k in keys]) / n
        b = np.array([counts["draft"][j].get(k, 0) for k in keys]) / n
        pooled = (a + b) / 2
        bound = 0.5 * 4 * np.sqrt(2 * pooled * (1 - pooled) / n).sum()  # 4 sigma per cell, two samples
        assert 0.5 * np.abs(a - b).sum() < bound


def test_a_runtime_drafts_through_text_and_says_so(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft=str(tiny["other_vocab"]), ctx_size=512, threads=1, exact=True,
                        parallel=2)
    rt = Runtime(opts, spec=SpecOptions(pause_slow_draft=False, suffix_cache="off"), announce=lambda _s: None)
    try:
        assert rt.draft_pairing.kind == "translated"
        for seq in (0, 1):  # every sequence's drafter translates, each with its own translator
            d = rt.sequence_drafter(seq)
            assert d.translator is not None
        assert rt.sequence_drafter(0).translator is not rt.sequence_drafter(1).translator
    finally:
        rt.close()


def test_a_draft_without_a_shared_text_encoding_is_refused_with_its_reason(tiny):
    main, wordpiece = Model(tiny["main"]).vocab_info(), Model(tiny["different_vocab"]).vocab_info()
    with pytest.raises(IncompatibleDraftError, match="no shared text encoding") as e:
        check_pairing(main, wordpiece, main_name="tiny-main", draft_name="tiny-wordpiece")
    assert "draft tiny-wordpiece" in e.value.message and "byte fallback" in e.value.fix
    with pytest.raises(IncompatibleDraftError, match="no shared text encoding"):
        Runtime(ModelOptions(model=str(tiny["main"]), draft=str(tiny["different_vocab"]), ctx_size=256, threads=1),
                announce=lambda _s: None)


def test_the_draft_listing_names_a_cross_vocabulary_draft_with_its_share_of_text(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("main", "other_vocab", "different_vocab"):
        (models / f"{name}.gguf").symlink_to(tiny[name])
    reg = Registry.scan(RegistryConfig(models_dir=models, index_dir=tmp_path / "index", builtin=False))
    lib = Library(reg, SettingsFile(tmp_path / "models.toml"))
    d = lib.describe(reg.find("main"))
    assert d["compatible_drafts"] == ["other_vocab"] and d["translated_drafts"] == {"other_vocab": 1.0}
    pairs = {p.draft: p for p in reg.pairings(reg.find("main"))}
    assert pairs["other_vocab"].translated and pairs["other_vocab"].reason is None
    assert "no shared text encoding" in pairs["different_vocab"].reason and not pairs["different_vocab"].translated


def test_translated_stats_keep_the_identity_under_a_grammar(main, drafter):
    """A grammar shapes the main model's rows, not the draft's: proposals it forbids are rejected like any other."""
    from tandem.spec.grammar import Grammar
    gp = GenParams(max_tokens=24, draft_max=4, draft_policy="fixed",
                   grammar=Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    prompt = main.model.tokenize("JSON:")
    plain, _ = run(main, prompt, dataclasses.replace(gp))
    spec, done = run(main, prompt, gp, drafter)
    assert spec == plain and done.stats.drafted > 0


def test_a_catalogue_main_gets_its_catalogue_draft_by_default(tiny, tmp_path, monkeypatch):
    """`make serve` serves a pulled catalogue model with the draft the catalogue names (SmolLM2 for the Qwen main, a
    draft of another vocabulary), unless the user set another; here the tiny main and its other-vocabulary draft stand
    in for them (the catalogue's table is the only thing replaced)."""
    from tandem.models import catalogue, library

    models = tmp_path / "models"
    models.mkdir()
    for name in ("main", "other_vocab", "draft_small"):
        (models / f"{name}.gguf").symlink_to(tiny[name])
    fake = {"tiny-main": catalogue.KnownModel("tiny-main", "main.gguf", tiny["main"].stat().st_size, "0" * 64, "",
                                              default_draft="tiny-other"),
            "tiny-other": catalogue.KnownModel("tiny-other", "other_vocab.gguf", tiny["other_vocab"].stat().st_size,
                                               "0" * 64, "")}
    monkeypatch.setattr(catalogue, "CATALOGUE", fake)
    monkeypatch.setattr(library, "CATALOGUE", fake)
    monkeypatch.setattr(library, "known_file", lambda name, size: next(
        (m for m in fake.values() if m.filename == name and m.size == size), None))
    reg = Registry.scan(RegistryConfig(models_dir=models, index_dir=tmp_path / "index", builtin=False))
    lib = Library(reg, SettingsFile(tmp_path / "models.toml"))
    assert lib.default_draft(reg.find("main")).id == "other_vocab"
    lib.set_draft("main", "draft_small")  # the user's choice wins
    assert lib.default_draft(reg.find("main")).id == "draft_small"
