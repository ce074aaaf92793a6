"""The real pair end to end, as `make serve` serves it: Qwen2.5-Coder-1.5B-Instruct Q4_K_M with its catalogue draft,
SmolLM2-135M-Instruct Q4_1, a model of another vocabulary that drafts through text. Skipped when the main model's file
is not there (about a minute of CPU when it is).

The model is $TANDEM_REAL_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (default folder /work/models); `tandem
models --models-dir DIR pull qwen2.5-coder-1.5b-instruct-q4_k_m` fetches it. `make serve` serves it by its id from the
models folder, which is what this test does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tandem.testing.serve_process import ServeProcess, child_env

FOLDER = Path(os.environ.get("TANDEM_REAL_MODELS") or "/work/models")
NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"
pytestmark = pytest.mark.skipif(not (FOLDER / f"{NAME}.gguf").is_file(), reason=(
    f"the real pair's main model {FOLDER / NAME}.gguf is not there: set TANDEM_REAL_MODELS to the folder that holds "
    f"it, or fetch it with `tandem models --models-dir DIR pull {NAME}`"))


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve --model NAME` from a models folder holding the main model only (no settings): the draft is the
    catalogue's default, the embedded SmolLM2."""
    home = tmp_path_factory.mktemp("real")
    (home / "models").mkdir()
    (home / "models" / f"{NAME}.gguf").symlink_to(FOLDER / f"{NAME}.gguf")
    env = child_env(TANDEM_MODELS_DIR=str(home / "models"), TANDEM_CONFIG=str(home / "models.toml"))
    server = ServeProcess(["--model", NAME, "--ctx-size", "2048", "--port", "0"], env=env)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_make_serves_pair_drafts_through_text_and_keeps_the_main_models_text(url):
    health = httpx.get(f"{url}/health", timeout=30).json()["model"]
    assert health["draft_model"].startswith("SmolLM2-135M") and health["draft_text_share"] > 0.99
    assert health["draft_paused"] is None  # the payoff check at load finds that the 135M draft can pay here
    listing = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    main = next(m for m in listing if m["id"] == NAME)
    assert main["default_draft_model"] == health["draft_model"] and health["draft_model"] in main[
        "translated_draft_models"]
    body = {"messages": [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
            "max_tokens": 96, "temperature": 0, "cache_prompt": False}
    with httpx.Client(base_url=url, timeout=300) as c:
        plain = c.post("/v1/chat/completions", json={**body, "draft_model": "none"}).json()
        spec = c.post("/v1/chat/completions", json=body).json()
    s = spec["stats"]
    assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert s["draft_tokens_by_source"].get("model", 0) > 0 and s["accepted_draft_tokens_count"] > 0
    assert (s["accepted_draft_tokens_count"] + s["rejected_draft_tokens_count"] + s["ignored_draft_tokens_count"]
            == s["total_draft_tokens_count"])
