"""`tandem run` as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tandem(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_json_output_has_tokens_with_sources_and_stats(tiny):
    r = tandem("run", "--model", str(tiny["main"]), "--draft", str(tiny["draft_close"]), "--prompt",
               "Once upon a time", "--max-tokens", "40", "--json", "--ctx-size", "512", "--draft-p-min", "0",
               "--draft-policy", "fixed", "--no-pause-slow-draft")  # drafts every step, though it cannot pay
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"].startswith("".join(t["text"] for t in out["tokens"]))
    s = out["stats"]
    assert s["total_draft_tokens_count"] == (s["accepted_draft_tokens_count"] + s["rejected_draft_tokens_count"]
                                             + s["ignored_draft_tokens_count"])
    assert sum(t["source"] == "draft" for t in out["tokens"]) == s["accepted_draft_tokens_count"] > 0
    for key in ("tokens_per_second", "time_to_first_token", "generation_time", "stop_reason", "draft_model",
                "acceptance_by_position"):
        assert key in s


def test_prompt_from_stdin_and_no_draft(tiny):
    r = tandem("run", "--model", str(tiny["main"]), "--draft", "none", "--max-tokens", "8", "--json",
               stdin="Hello there")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["stats"]
    assert s["draft_model"] is None and s["total_draft_tokens_count"] == 0


@pytest.mark.parametrize("case, expect", [
    ("missing", "does not exist"),
    ("not_gguf", "not a GGUF"),
    ("incompatible", "no shared text encoding"),
    ("too_long", "context holds"),
    ("empty", "prompt is empty"),
])
def test_bad_input_exits_2_with_one_line_cause_and_fix(tiny, tmp_path, case, expect):
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    args = {
        "missing": ["--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"],
        "not_gguf": ["--model", str(bad), "--prompt", "hi"],
        "incompatible": ["--model", str(tiny["main"]), "--draft", str(tiny["different_vocab"]), "--prompt", "hi"],
        "too_long": ["--model", str(tiny["main"]), "--ctx-size", "256", "--prompt", "word " * 400],
        "empty": ["--model", str(tiny["main"]), "--prompt", "  "],
    }[case]
    r = tandem("run", *args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert expect in lines[0] and ": " in lines[0]


def test_logit_bias_penalties_and_logprobs_flags(tiny):
    r = tandem("run", "--model", str(tiny["main"]), "--draft", str(tiny["draft_close"]), "--prompt",
               "Once upon a time", "--max-tokens", "5", "--json", "--ctx-size", "512", "--logit-bias", "1000=100",
               "--logprobs", "2", "--presence-penalty", "0.5", "--repeat-penalty", "1.1", "--no-pause-slow-draft")
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout)["tokens"]
    assert [t["id"] for t in tokens] == [1000] * 5
    for t in tokens:
        assert t["logprob"] == pytest.approx(0.0, abs=1e-4) and len(t["top_logprobs"]) == 2
        assert t["top_logprobs"][0]["id"] == 1000


@pytest.mark.parametrize("flags, expect", [
    (["--logit-bias", "x"], "--logit-bias 'x' is not ID=BIAS"),
    (["--logit-bias", "5=1000"], "between -100 and 100"),
    (["--presence-penalty", "3"], "presence_penalty must be between -2 and 2"),
    (["--repeat-penalty", "0"], "repeat_penalty must be > 0"),
    (["--logprobs", "21"], "logprobs must be between 0 and 20"),
])
def test_bad_sampling_flags_exit_2(tiny, flags, expect):
    r = tandem("run", "--model", str(tiny["main"]), "--draft", "none", "--prompt", "hi", "--max-tokens", "2", *flags)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr, r.stderr
