"""`tandem fit`: the plan per model, the memory, the verdict, fixes, and what a smaller draft context saves."""

from __future__ import annotations

import json

from tandem.cli import main
from tandem.models.fit import MIB


def fit(capsys, tiny, *extra: str) -> tuple[int, str, str]:
    code = main(["fit", "--model", str(tiny["main"]), "--threads", "1", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_prints_each_component_and_the_verdict(capsys, tiny):
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "4096")
    assert code == 0
    for label in ("weights", "KV cache", "compute buffer", "output buffer", "total", "available", "VRAM"):
        assert label in out
    assert f"main {tiny['main'].stem}" in out and f"draft {tiny['draft_small'].stem}" in out
    assert "4096 tokens (4096 KV cells)" in out and "verdict      fits" in out


def test_fit_json_and_the_draft_context_saving(capsys, tiny):
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "8192",
                       "--ctx-size-draft", "1024", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["fits"] and plan["main"]["n_ctx"] == 8192 and plan["draft"]["n_ctx"] == 1024
    assert plan["total"] == plan["process"] + plan["main"]["total"] + plan["draft"]["total"]
    assert plan["process"] > 0 and plan["draft"]["contexts"] == 1
    saving = {s["n_ctx"]: s for s in plan["draft_savings"]}
    assert saving[1024]["saved"] > 0 and saving[1024]["total"] == plan["draft"]["total"]
    code, text, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "8192",
                        "--ctx-size-draft", "1024")
    assert "1024" in text and "saves" in text and "<- this plan" in text


def test_fit_that_does_not_fit_exits_3_with_the_largest_context_and_fixes(capsys, tiny):
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--json", "--ctx-size", "16384")
    need = json.loads(out)
    limit = need["main"]["total"] + need["draft"]["total"] - 8 * MIB
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "16384",
                       "--memory-limit", str(limit))
    assert code == 3
    assert "does not fit: draft" in out and "free after the main model" in out
    assert "largest --ctx-size that fits:" in out and "  - --ctx-size-draft " in out and "  - --draft none" in out
    assert "(--memory-limit;" in out


def test_fit_refuses_a_missing_file_with_exit_2(capsys, tiny, tmp_path):
    code = main(["fit", "--model", str(tmp_path / "nope.gguf"), "--draft", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "check the path" in err


def test_run_refuses_a_plan_that_does_not_fit_before_loading(capsys, tiny):
    code = main(["run", "--model", str(tiny["main"]), "--draft", str(tiny["draft_small"]), "--threads", "1",
                 "--memory-limit", "8M", "--prompt", "Hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 3 and "does not fit: main" in err and "smaller or more quantized main model" in err


def test_fit_parallel_shows_the_share_per_request_and_the_draft_contexts(capsys, tiny):
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "4096", "--parallel", "4")
    assert code == 0
    assert "--parallel 4: --ctx-size is the total, 1024 positions per request" in out
    assert out.count("1 (4 requests)") == 2 and "(each)" not in out  # one draft context holds every request
    assert out.count("4096 tokens (4096 KV cells)") == 2
    assert "process" in out and "4096" in out.split("<- this plan")[0].splitlines()[-1]
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "4096", "--parallel", "4",
                       "--json")
    plan = json.loads(out)
    d = plan["draft"]
    assert d["contexts"] == 1 and d["n_ctx"] == 4096 and plan["main"]["contexts"] == 1
    assert d["total"] == d["weights"] + d["overhead"] + d["kv"] + d["compute"] + d["output"] + d["work"]
    code, out, _ = fit(capsys, tiny, "--draft", str(tiny["draft_small"]), "--ctx-size", "4096", "--parallel", "4",
                       "--ctx-size-draft", "2048")  # a smaller draft context: one per request, sliding
    assert code == 0 and "4 (one per request)" in out and "KV cache (each)" in out
    assert "512 tokens (512 KV cells)" in out
