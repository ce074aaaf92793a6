"""llama.cpp's llama-server as a benchmark peer: started on loopback with Tandem's models and settings.

`tandem bench --llama-server PATH` adds it next to Tandem's own configurations so that users compare
both on one machine in one run. Its numbers come from the `timings` object of its /completion answer
(predicted_per_second, draft_n, draft_n_accepted), the way llama-server itself reports them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tandem.errors import BadInputError

START_TIMEOUT = 180.0
"""Seconds to wait for a peer's /health to answer 200 (model loading included)."""


@dataclass(frozen=True)
class PeerSettings:
    """The settings a llama-server peer is started with, mirrored from Tandem's."""

    main: Path
    """Main model GGUF."""
    draft: Path | None = None
    """Draft model GGUF (--spec-draft-model); None for no draft."""
    spec_type: str | None = None
    """llama-server --spec-type (e.g. ngram-mod); None: draft-simple with a draft, else none. (Its default is
    none: without --spec-type it loads the draft and never drafts.)"""
    ctx_size: int = 4096
    """-c."""
    threads: int = 2
    """-t and --spec-draft-threads."""
    cache_type_k: str = "f32"
    """-ctk (Tandem's main KV default is f32)."""
    cache_type_v: str = "f32"
    """-ctv."""
    draft_max: int = 8
    """--spec-draft-n-max."""
    draft_min: int = 0
    """--spec-draft-n-min."""
    draft_p_min: float = 0.5
    """--spec-draft-p-min."""
    parallel: int = 1
    """-np: requests decoded together."""
    extra: tuple[str, ...] = field(default=())
    """More arguments, passed as they are."""

    def argv(self, binary: Path, port: int) -> list[str]:
        a = [str(binary), "-m", str(self.main), "--host", "127.0.0.1", "--port", str(port), "-c", str(self.ctx_size),
             "-t", str(self.threads), "-np", str(self.parallel), "-ctk", self.cache_type_k, "-ctv", self.cache_type_v,
             "-fa", "off", "--no-webui"]
        if self.draft is not None:
            a += ["--spec-draft-model", str(self.draft), "--spec-draft-threads", str(self.threads)]
        spec_type = self.spec_type or ("draft-simple" if self.draft is not None else None)
        if spec_type is not None:
            a += ["--spec-type", spec_type]
        if self.draft is not None or self.spec_type is not None:
            a += ["--spec-draft-n-max", str(self.draft_max), "--spec-draft-n-min", str(self.draft_min),
                  "--spec-draft-p-min", str(self.draft_p_min)]
        if _has_amx():
            a += ["--no-repack"]
        return a + list(self.extra)


def _has_amx() -> bool:
    """Whether this CPU has AMX: llama.cpp then puts quantized weights (the Q4_1 draft) in AMX buffers, and
    llama-server dies with an illegal instruction at the first drafted request (llama.cpp issue 20824). --no-repack
    keeps them in plain buffers, as Tandem's patch does (GGML_AMX): no type of the default pair is repacked
    otherwise, but on such a CPU a Q4_0/Q4_K main loses llama.cpp's repacked kernels too."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@dataclass(frozen=True)
class PeerResult:
    """One completion's numbers as llama-server reports them."""

    token_ids: list[int]
    tokens: int
    seconds: float
    tokens_per_second: float
    time_to_first_token: float
    drafted: int
    accepted: int


class LlamaServerPeer:
    """One llama-server process; `complete()` runs a greedy generation from prompt token ids."""

    def __init__(self, binary: Path, settings: PeerSettings, *, name: str = "llama-server"):
        if not binary.is_file():
            raise BadInputError(f"llama-server binary {binary} does not exist",
                                "build it (cmake --build BUILD --target llama-server) or drop --llama-server")
        self.binary, self.settings, self.name = binary, settings, name
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(prefix=f"tandem-{name}-", suffix=".log", delete=False)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(self.settings.argv(self.binary, self.port), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BadInputError(f"{self.name} exited with code {self.proc.returncode} while starting: "
                                    f"{self.log_tail()}", "check the binary and its flags, or drop --llama-server")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.close()
        raise BadInputError(f"{self.name} did not become healthy within {START_TIMEOUT:.0f} s: {self.log_tail()}",
                            "check its log, or drop --llama-server")

    def complete(self, prompt: Sequence[int], max_tokens: int, *, cache_prompt: bool = False,
                 timeout: float = 600.0, temperature: float = 0.0, seed: int | None = None) -> PeerResult:
        """A completion, greedy unless a `temperature` is given (then sampled with `seed`); `cache_prompt` lets
        llama-server reuse the prefix its slot still holds; `timeout`: seconds to wait for the answer."""
        sampling = ({"temperature": 0.0, "top_k": 1} if temperature <= 0 else
                    {"temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed})
        body = {"prompt": list(prompt), "n_predict": max_tokens, **sampling,
                "cache_prompt": cache_prompt, "return_tokens": True, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        t = out.get("timings", {})
        n = int(t.get("predicted_n", len(out.get("tokens", []))))
        return PeerResult(list(out.get("tokens", [])), n, t.get("predicted_ms", 0.0) / 1000,
                          float(t.get("predicted_per_second", 0.0)), t.get("prompt_ms", 0.0) / 1000,
                          int(t.get("draft_n", 0)), int(t.get("draft_n_accepted", 0)))

    def stream(self, prompt: Sequence[int], max_tokens: int) -> tuple[int, float]:
        """A greedy completion streamed as a client reads it: (tokens generated, seconds to the first token)."""
        body = {"prompt": list(prompt), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                "cache_prompt": False, "stream": True}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0, first, tokens = time.perf_counter(), None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("content"):
                    first = time.perf_counter() - t0
                if chunk.get("stop"):
                    tokens = int(chunk.get("timings", {}).get("predicted_n", chunk.get("tokens_predicted", 0)))
        return tokens, first if first is not None else time.perf_counter() - t0

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def parallel_peer(binary: Path, main: Path, draft: Path | None, *, ctx_size: int, threads: int,
                  parallel: int, spec_type: str | None = None) -> LlamaServerPeer:
    """llama-server -np `parallel` as the concurrent modes (bench serve, disconnect) run it: Tandem's settings
    (f16 KV, the draft drafting up to 16 tokens whatever its confidence; or `spec_type`, e.g. ngram-mod), not
    started."""
    settings = PeerSettings(main=main, draft=draft, ctx_size=ctx_size, threads=threads or 2, cache_type_k="f16",
                            cache_type_v="f16", parallel=parallel, draft_max=16, draft_p_min=0.0)
    return LlamaServerPeer(binary, settings if spec_type is None else replace(settings, spec_type=spec_type))
