"""`tandem bench` on the tiny fixtures: all configurations side by side, the three outputs written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROMPTS = [{"id": "story", "prompt": "Once upon a time"}, {"id": "list", "prompt": "one two three one two three"}]


def test_bench_writes_markdown_json_and_png_for_every_config(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]),
                        "--draft", str(tiny["draft_same"]), "--prompts", str(prompts), "--max-tokens", "24",
                        "--reps", "2", "--ctx-size", "256", "--draft-policy", "fixed", "--draft-p-min", "0",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    rows = {(row["config"], row["prompt_id"]): row for row in data["rows"]}
    for cfg in ("no-draft", "draft-model", "ngram", "both"):
        assert f"| {cfg} | all |" in table
        for pid in ("story", "list", "all"):
            row = rows[(cfg, pid)]
            assert row["same_output"], (cfg, pid)  # greedy output equals no-draft's, every rep
            assert row["tokens_per_second"] > 0
    assert rows[("no-draft", "all")]["ratio"] == 1.0 and rows[("no-draft", "all")]["end_to_end_ratio"] == 1.0
    assert rows[("draft-model", "all")]["end_to_end_ratio"] > 0
    assert rows[("draft-model", "all")]["acceptance"] == 1.0  # draft == main
    assert len(data["samples"]) == 4 * len(PROMPTS) * 2
    assert {s["config"] for s in data["samples"] if s["drafted"] > 0} >= {"draft-model", "both"}


def test_bench_without_a_draft_model_skips_the_configs_that_need_one(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[1]) + "\n")
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]), "--draft", "none",
                        "--prompts", str(prompts), "--max-tokens", "8", "--reps", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipping draft-model, both" in r.stderr
    configs = {row["config"] for row in json.loads((tmp_path / "o" / "bench.json").read_text())["rows"]}
    assert configs == {"no-draft", "ngram"}


def test_a_missing_llama_server_binary_is_bad_input(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]), "--draft", "none",
                        "--prompts", str(prompts), "--llama-server", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "llama-server binary" in r.stderr and "does not exist" in r.stderr


@pytest.mark.skipif(not os.environ.get("TANDEM_LLAMA_SERVER"), reason="set TANDEM_LLAMA_SERVER to a llama-server binary")
def test_llama_server_peer_runs_side_by_side(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[1]) + "\n")
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]),
                        "--draft", str(tiny["draft_same"]), "--prompts", str(prompts), "--max-tokens", "16",
                        "--reps", "1", "--ctx-size", "256", "--llama-server", os.environ["TANDEM_LLAMA_SERVER"],
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {(row["config"], row["prompt_id"]): row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert rows[("llama-server", "all")]["tokens_per_second"] > 0
    assert rows[("llama-server-draft", "all")]["acceptance"] > 0.9  # draft == main
    assert "vs llama-server-draft" in r.stdout


def test_end_to_end_ratio_counts_the_prompt_phase():
    """A config that moves work from the decode phase into the prompt phase gains tok/s, not end-to-end time."""
    from tandem.bench import Sample, summarize, versus

    def sample(cfg: str, ttft: float, seconds: float) -> Sample:
        return Sample(cfg, "p", 0, 101, seconds, 100 / seconds, ttft, 0, 0, 0.0, 0.0, 0, 0, 0.0, [1])

    samples = [sample("no-draft", 0.1, 2.0), sample("draft-model", 0.6, 1.5)]
    row = next(r for r in summarize(samples) if r.config == "draft-model" and r.prompt_id == "all")
    assert row.ratio == pytest.approx(2.0 / 1.5) and row.end_to_end_ratio == pytest.approx(1.0)
    assert versus(samples, "draft-model", "no-draft", end_to_end=True) == pytest.approx(1.0)
