"""Prompt sets shipped with the package (copied from the project's shared prompts)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


def dev_prompts() -> list[str]:
    """The ten development prompts used by the equivalence tests and development benchmarks."""
    text = (DATA / "dev_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def lmstudio_prompts() -> list[str]:
    """The three prompts of LM Studio's speculative-decoding release benchmark."""
    text = (DATA / "lmstudio_blog.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]
