"""Shared fixtures: tiny GGUF models built once per test session with the gguf package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.testing.tiny import build_fixture_set


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny models: main, draft_same, draft_close, draft_small, different_vocab, main_f16.

    Built into TANDEM_FIXTURE_DIR when set (reused between runs), else a session temp dir.
    """
    root = os.environ.get("TANDEM_FIXTURE_DIR")
    out = Path(root) if root else tmp_path_factory.mktemp("tiny")
    return build_fixture_set(out)


@pytest.fixture(autouse=True)
def _no_user_models(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test (and the `tandem` subprocesses it starts) away from the user's models folder and
    per-model defaults file: an empty models folder and no settings file unless a test sets its own."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(root / "models"))
    monkeypatch.setenv("TANDEM_CONFIG", str(root / "models.toml"))
