"""`tandem bench` on the tiny fixtures: all configurations side by side, the three outputs written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

PROMPTS = [{"id": "story", "prompt": "Once upon a time"}, {"id": "list", "prompt": "one two three one two three"}]


def test_bench_writes_markdown_json_and_png_for_every_config(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]),
                        "--draft", str(tiny["draft_same"]), "--prompts", str(prompts), "--max-tokens", "24",
                        "--reps", "2", "--ctx-size", "256", "--draft-policy", "fixed", "--draft-p-min", "0",
                        "--exact",  # the tiny models nearly tie everywhere: only exact mode keeps every output equal
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    rows = {(row["config"], row["prompt_id"]): row for row in data["rows"]}
    for cfg in ("no-draft", "default", "draft-model", "ngram", "both"):
        assert f"| {cfg} | all |" in table
        for pid in ("story", "list", "all"):
            row = rows[(cfg, pid)]
            assert row["same_output"], (cfg, pid)  # greedy output equals no-draft's, every rep
            assert row["tokens_per_second"] > 0
    assert rows[("no-draft", "all")]["ratio"] == 1.0 and rows[("no-draft", "all")]["end_to_end_ratio"] == 1.0
    assert rows[("draft-model", "all")]["end_to_end_ratio"] > 0
    assert rows[("draft-model", "all")]["acceptance"] == 1.0  # draft == main
    assert len(data["samples"]) == 5 * len(PROMPTS) * 2
    # --exact keeps the configured draft on ("default" drafts too) even though the tiny draft cannot pay
    assert {s["config"] for s in data["samples"] if s["drafted"] > 0} >= {"default", "draft-model", "both"}


def test_bench_without_a_draft_model_skips_the_configs_that_need_one(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[1]) + "\n")
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "--model", str(tiny["main"]), "--draft", "none",
                        "--prompts", str(prompts), "--max-tokens", "8", "--reps", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipping draft-model, both" in r.stderr
    configs = {row["config"] for row in json.loads((tmp_path / "o" / "bench.json").read_text())["rows"]}
    assert configs == {"no-draft", "default", "ngram"}


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
    from tandem.benchmarks.compare import Sample, summarize, versus

    def sample(cfg: str, ttft: float, seconds: float) -> Sample:
        return Sample(cfg, "p", 0, 101, seconds, 100 / seconds, ttft, 0, 0, 0.0, 0.0, 0, 0, 0.0, [1])

    samples = [sample("no-draft", 0.1, 2.0), sample("draft-model", 0.6, 1.5)]
    row = next(r for r in summarize(samples) if r.config == "draft-model" and r.prompt_id == "all")
    assert row.ratio == pytest.approx(2.0 / 1.5) and row.end_to_end_ratio == pytest.approx(1.0)
    assert versus(samples, "draft-model", "no-draft", end_to_end=True) == pytest.approx(1.0)


# The other modes (`tandem bench MODE`): each once on the tiny fixtures, at the smallest settings.


ONE_THREAD = ("--threads", "1")
"""Tiny models gain nothing from more threads, and a busy machine slows spinning threads down."""


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows of `text` whose first cell starts with first_cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0].startswith(first_cell)]


def test_help_lists_every_mode_and_the_compare_options():
    from tandem.benchmarks import MODES

    r = bench("--help")
    assert r.returncode == 0, r.stderr
    for mode in MODES:
        assert f"\n    {mode} " in r.stdout, mode
    assert "--configs" in r.stdout and "--llama-server" in r.stdout  # the default mode's options
    r = bench("window", "--help")
    assert r.returncode == 0 and "--draft-ctx" in r.stdout and "--configs" not in r.stdout


def test_mode_arguments_are_checked(tmp_path):
    r = bench("costs", "--reps", "0")
    assert r.returncode == 2 and "--reps: must be at least 1" in r.stderr
    r = bench("rows", "--types", "q3_x")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = bench("payoff", "--model", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "--model" in r.stderr and "does not exist" in r.stderr
    r = bench("window", "--max-tokens", "100")
    assert r.returncode == 2 and "at least 600" in r.stderr


def test_costs_by_batch_size_and_by_position(tiny):
    r = bench("costs", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--reps", "1", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (main,) = table_rows(r.stdout, "main ")
    (draft,) = table_rows(r.stdout, "draft ")
    assert all(c.endswith(" ms") and float(c.split()[0]) > 0 for c in main[2:]) and len(main) == 8
    assert draft[2].endswith(" ms") and draft[3].endswith(" ms") and draft[4] == ""  # the draft: 1 and 2 tokens
    r = bench("costs", "--by-position", "--model", str(tiny["main"]), "--positions", "40", "90", "--reps", "1",
              *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert [(row[0], row[1]) for row in table_rows(r.stdout, "f")] == [("f32", "1"), ("f32", "17"), ("f16", "1"),
                                                                       ("f16", "17")]
    assert "position 90" in r.stdout


def test_rows_probe_finds_batches_of_two_or_more_alike(tiny):
    r = bench("rows", "--model", str(tiny["main"]), str(tiny["main_f16"]), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout, "tiny-main")
    assert [(row[0].split("-")[-2], row[1]) for row in rows] == [("main", "no"), ("main", "yes"), ("f16", "no"),
                                                                 ("f16", "yes")]
    assert all(float(row[3]) == 0.0 for row in rows if row[1] == "no")  # what exact decoding relies on


def test_exactness_counts_no_divergence_with_a_draft_equal_to_the_main(tiny, tmp_path):
    out = tmp_path / "exactness.json"
    r = bench("exactness", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--max-tokens", "6",
              "--num-prompts", "3", "--out", str(out), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(out.read_text())["results"]
    assert res["exact"]["diverged"] == [] and len(res["exact"]["spec_tok_s"]) == 3
    assert res["plain_exact_vs_no_exact"] > 0 and "| exact | 0/3 |" in r.stdout


def test_payoff_reports_the_load_time_figure_and_a_second_timing(tiny):
    r = bench("payoff", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (row,) = table_rows(r.stdout, "tiny-main")
    at_load, again, k = row[1], row[2], row[3]
    assert float(at_load.rstrip("x")) > 0 and float(again.rstrip("x")) > 0 and 1 <= int(k) <= 16
    assert row[4].endswith(" ms") and row[5].endswith(" ms")


def test_kv_types_compares_f16_and_f32_main_caches(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[1]) + "\n")
    r = bench("kv-types", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--prompts", str(prompts),
              "--max-tokens", "6", "--reps", "1", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "main KV f16: draft-model" in r.stdout and "main KV f32: draft-model" in r.stdout
    assert "draft-model: f16 / f32 KV" in r.stdout and "draft-model output equal, f16 vs f32 KV:" in r.stdout


def test_fit_tables_plan_against_llama_cpp_per_context(tiny):
    r = bench("fit", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--ctx-size", "256",
              "--q8-ctx-size", "512", "--threads", "1")
    assert r.returncode == 0, r.stderr
    per_model = [row for row in table_rows(r.stdout, "256") + table_rows(r.stdout, "512") if len(row) == 9]
    assert [(row[0], row[1].split()[0]) for row in per_model] == [("256", "main"), ("256", "draft"),
                                                                  ("512, q8_0 draft K", "main"),
                                                                  ("512, q8_0 draft K", "draft")]
    assert per_model[3][2] == "q8_0/f16" and all(row[-1] == "yes" for row in per_model)
    assert len([row for row in table_rows(r.stdout, "256") if len(row) == 5]) == 1  # the whole-process table


def test_window_slides_the_draft_and_keeps_the_output(tiny, tmp_path):
    out = tmp_path / "window"
    r = bench("window", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--ctx-size", "1024",
              "--draft-ctx", "256", "--max-tokens", "600", "--warmup", "16", "--reps", "1", "--draft-policy", "fixed",
              "--no-baseline", "--out", str(out), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    (setting,) = data["settings"]
    assert setting["shifts"] > 0 and setting["runs"][0]["generated"] == 600  # the window slid
    assert data["same_tokens_everywhere"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_reuses_each_earlier_turn_and_a_cold_run_reuses_nothing(tiny):
    r = bench("chat", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--turns", "3",
              "--max-tokens", "6", "--ctx-size", "2048", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    prompts, reused = [int(row[1]) for row in rows], [int(row[2]) for row in rows]
    assert prompts[0] < prompts[1] < prompts[2]  # each turn holds the earlier ones
    assert reused[0] <= 1 and all(prompts[i - 1] - 2 <= reused[i] < prompts[i] for i in (1, 2))  # (BPE may merge)
    assert all(float(cell) > 0 for row in rows for cell in row[3:6])
    assert "last turn / first turn: default" in r.stdout


def test_batch_runs_requests_together_and_one_after_another(tiny):
    r = bench("batch", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--concurrency", "1", "2",
              "--max-tokens", "6", "--ctx-size", "256", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert all(float(row[i]) > 0 for i in (1, 2, 4, 5)) and row[3].endswith("x") and row[6].endswith("x")


def test_batch_fixed_prices_each_draft_length_against_no_draft(tiny):
    r = bench("batch", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--concurrency", "2",
              "--max-tokens", "6", "--ctx-size", "256", "--fixed", "1", "3", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "| N | batched, no draft | draft, adaptive | draft, fixed k = 1 | draft, fixed k = 3 |" in r.stdout
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert len(rows) == 1 and rows[0][0] == "2" and float(rows[0][1]) > 0
    assert all(cell.endswith("x)") and float(cell.split()[0]) > 0 for cell in rows[0][2:5])


def test_serve_clients_send_their_rounds_one_after_another():
    from tandem.benchmarks.serve import _clients
    sent: list[tuple[str, int]] = []

    def send(j: int) -> tuple[int, float]:
        sent.append((threading.current_thread().name, j))
        return 10, 0.001
    rate, latencies, firsts = _clients(2, send, rounds=3)
    assert sorted(j for _, j in sent) == [0, 1, 2, 3, 4, 5] and len(latencies) == len(firsts) == 6 and rate > 0
    by_client = {}
    for thread, j in sent:
        by_client.setdefault(thread, []).append(j)
    assert sorted(by_client.values()) == [[0, 2, 4], [1, 3, 5]]  # each client's requests in turn, in order


def test_serve_measures_concurrent_clients_over_http(tiny):
    r = bench("serve", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--concurrency", "1", "2",
              "--max-tokens", "6", "--ctx-size", "256", "--also-parallel", "2", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [
        ("1", "tandem"), ("1", "tandem --draft none"), ("1", "tandem --parallel 2"),
        ("1", "tandem --parallel 2 --draft none"), ("2", "tandem"), ("2", "tandem --draft none")]
    assert all(float(row[2]) > 0 and 0 < float(row[3]) <= float(row[4]) for row in rows)
    assert all(0 < float(row[5]) <= float(row[6]) and float(row[5]) <= float(row[3]) for row in rows)  # first token


def test_disconnect_times_the_next_request_after_a_dropped_stream(tiny):
    r = bench("disconnect", "--model", str(tiny["main"]), "--draft", str(tiny["draft_same"]), "--parallel", "1", "2",
              "--reps", "2", "--long-tokens", "120", "--read-tokens", "3", "--ctx-size", "256", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "tandem"), ("1", "tandem --draft none"), ("2", "tandem"),
                                                  ("2", "tandem --draft none")]
    assert all(0 < float(row[2]) <= float(row[3]) for row in rows)


def test_same_text_counts_texts_equal_to_draft_none_through_tandem_serve(tiny, tmp_path):
    from tandem.engine.library import exact_kernels
    if not exact_kernels():
        pytest.skip("greedy text equal by construction needs Tandem's llama.cpp patch, level 5")
    out = tmp_path / "same.json"
    r = bench("same-text", "--model", str(tiny["main"]), "--draft", str(tiny["draft_close"]), "--max-tokens", "8",
              "--servers", "draft-model", "--concurrency", "2", "--json", str(out), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(out.read_text())["results"]
    assert res["regime"] == "kernels" and res["alone_drafted"] > 0 and res["crowd_drafted"] > 0
    assert res["alone_same"] == res["alone_n"] == 8 and res["crowd_same"] == res["crowd_n"] == 2
    assert "| draft-model | kernels | 8/8 |" in r.stdout


def test_costs_lone_row_prices_exact_decoding_against_the_one_row_kernels(tiny):
    from tandem.engine.library import exact_kernels
    if not exact_kernels():
        pytest.skip("the one-row switch is part of Tandem's llama.cpp patch, level 5")
    r = bench("costs", "--lone-row", "--model", str(tiny["main"]), "--reps", "3", *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    (row,) = table_rows(r.stdout, "tiny-main")
    assert row[1].endswith(" ms") and row[2].endswith(" ms") and float(row[3].rstrip("x")) > 0


def test_suffix_runs_fresh_repeated_and_trace_requests_with_the_texts_of_draft_none(tiny, tmp_path):
    from tandem.engine.library import exact_kernels
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "suffix.json"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    r = bench("suffix", "--model", str(tiny["main"]), "--prompts", str(prompts),
              "--max-tokens", "12", "--turns", "2", "--trace-tokens", "16", "--ctx-size", "1024", "--out", str(out),
              *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"tandem-plain", "tandem"}
    assert res["tandem"]["repeat"]["cache_drafts"] > 0  # the repeats drafted from the first answers
    for name in ("fresh", "repeat", "trace"):
        assert res["tandem"][name]["tokens"] > 0
        if exact_kernels():  # (the tiny models nearly tie everywhere: equal text needs the patch's exact kernels)
            assert res["tandem"][name]["texts"] == res["tandem-plain"][name]["texts"]
    assert "| repeat |" in r.stdout


def test_suffix_clients_runs_traces_at_once_over_http(tiny, tmp_path):
    out = tmp_path / "clients.json"
    r = bench("suffix", "--model", str(tiny["main"]), "--clients", "2", "--turns", "1", "--trace-tokens", "8",
              "--ctx-size", "512", "--out", str(out), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"tandem-plain", "tandem"} and all(v["tokens"] > 0 and v["tok_s"] > 0 for v in res.values())


def test_agent_times_each_tool_round_trip_through_the_messages_api(tiny, tmp_path):
    """Qwen2.5's template and tool tokens (tiny model): every turn forces a call, answered by a tool_result; from the
    second turn on the prompt cache holds the conversation so far (turn n+1 reuses at least turn n's prompt)."""
    from tandem.testing.tiny import QWEN_TOOLS, build_extra
    out = tmp_path / "agent.json"
    r = bench("agent", "--model", str(build_extra(tiny["main"].parent, QWEN_TOOLS)), "--draft", "none",
              "--prompt-tokens", "1000", "--round-trips", "2", "--result-lines", "6", "--max-tokens", "200",
              "--ctx-size", "2048", "--json", str(out), *ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert abs(res["first_prompt_tokens"] - 1000) <= 30 and res["draft"] == "none"
    (turns,) = [s["turns"] for s in res["servers"].values()]
    assert [t["turn"] for t in turns] == [1, 2, 3] and turns[0]["ratio"] == 1.0
    assert all(len(t["calls"]) == 1 and t["calls"][0]["name"] in ("list_files", "read_file", "search_code",
                                                                  "run_tests") for t in turns)
    assert all(0 < t["start_s"] <= t["ttft_s"] <= t["total_s"] for t in turns)
    assert turns[0]["cached_tokens"] <= 8  # (the warm-up's system prompt shares the template's first tokens)
    for before, now in zip(turns, turns[1:]):
        assert now["cached_tokens"] >= before["cached_tokens"] + before["input_tokens"] - 2  # (BPE may merge)
        assert now["ratio"] == pytest.approx(now["ttft_s"] / turns[0]["ttft_s"], abs=1e-3)
    rows = [row for row in table_rows(r.stdout, "") if row[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3"] and rows[0][3] == "1.00x"
    assert f"tandem: {'PASS' if res['servers']['tandem']['pass'] else 'FAIL'}: every later turn's TTFT <= 1.5x" \
        in r.stdout
