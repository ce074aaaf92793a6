"""Peak resident memory of the whole server process: `tandem serve` and llama-server, one after the other, each sent
the same long prompt, next to the memory plan (`tandem fit`).

For each --parallel N and each draft setting (--draft none, and the draft): `tandem serve --ctx-size C --parallel N`
in a process of its own, then (with --llama-server PATH) `llama-server -c C -np N` with the same model, context, KV
types and threads. Each gets N requests at once, of the same prompt token ids: a request fills its share of the
context (--prompt-tokens, at most C/N less --max-tokens), so the KV cache, the compute buffers and ggml's work
buffer reach their peak. The figure is the process's peak RSS (VmHWM in /proc/PID/status) after the answers;
the plan's is what `tandem fit` says for the same options (the models and the process). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.benchmarks.common import add_model_arguments, draft_file, one_main, positive_int
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.config import ModelOptions
from tandem.errors import BadInputError
from tandem.models.fit import MIB, plan_for
from tandem.prompts import DATA

HELP = "peak RSS of tandem serve vs llama-server with a context-filling prompt, next to the memory plan"
"""One line for `tandem bench --help`."""

START_TIMEOUT = 300.0
"""Seconds to wait for a server's /health to answer 200 (loading included)."""
REQUEST_TIMEOUT = 3600.0
"""Seconds to wait for an answer (a context-filling prompt on a busy machine takes minutes)."""


@dataclass(frozen=True)
class Case:
    """One server configuration, measured for Tandem and llama-server."""

    parallel: int
    """Requests at once (--parallel / -np)."""
    draft: Path | None
    """Draft model; None: --draft none."""


@dataclass(frozen=True)
class Result:
    """A case's peaks and the plan."""

    case: Case
    """What was measured."""
    prompt_tokens: int
    """Prompt tokens per request."""
    plan_total: int
    """The memory plan's total for Tandem (models and process), bytes."""
    plan_models: int
    """The plan's models alone (what llama-server allocates too), bytes."""
    tandem: int
    """Tandem's peak RSS, bytes."""
    peer: int | None
    """llama-server's peak RSS, bytes (None: not run)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--ctx-size", type=positive_int, default=8192, help="context size, -c (default: 8192)")
    p.add_argument("--prompt-tokens", type=positive_int, default=7644,
                   help="prompt tokens per request, at most the request's share of the context (default: 7644)")
    p.add_argument("--max-tokens", type=positive_int, default=4, help="tokens generated per request (default: 4)")
    p.add_argument("--parallel", type=positive_int, nargs="+", default=[1, 4], help="N (default: 1 4)")
    p.add_argument("--drafts", nargs="+", choices=("none", "draft"), default=["none", "draft"],
                   help="without a draft (--draft none) and with it (default: both)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH", help="also measure llama-server")


def peak_rss(pid: int) -> int:
    """VmHWM of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BadInputError(f"/proc/{pid}/status has no VmHWM", "run the memory bench on Linux")


def prompt_ids(model: Path, n: int) -> list[int]:
    """n token ids of the bench prompts, repeated (tokenized by the main model's vocabulary)."""
    from tandem.engine.llama import Model

    text = " ".join(json.loads(line)["prompt"] for name in ("bench", "dev", "heldout")
                    for line in (DATA / f"{name}_prompts.jsonl").read_text().splitlines() if line.strip())
    m = Model(model)
    try:
        ids = m.tokenize(text, add_special=False)
        bos = [m.bos] if m.add_bos and m.bos >= 0 else []
    finally:
        m.close()
    return (bos + ids * (n // max(1, len(ids)) + 1))[:n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
        r.read()


def _at_once(n: int, send) -> None:
    """send(i) for i < n in n threads at once; the first error is raised."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            send(i)
        except (urllib.error.URLError, OSError) as e:
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BadInputError(f"a request failed: {errors[0]}", "see the server's log")


def tandem_peak(main: Path, case: Case, args: argparse.Namespace, ids: Sequence[int]) -> int:
    """Start `tandem serve`, send the case's requests, return its peak RSS."""
    port = _free_port()
    argv = [sys.executable, "-m", "tandem", "serve", "--model", str(main),
            "--draft", str(case.draft) if case.draft else "none", "--ctx-size", str(args.ctx_size),
            "--parallel", str(case.parallel), "--threads", str(args.threads), "--port", str(port)]
    with tempfile.NamedTemporaryFile(prefix="tandem-memory-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BadInputError(f"tandem serve did not start (see {log.name})", "check the options")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        body = {"prompt": list(ids), "max_tokens": args.max_tokens, "temperature": 0}
        _at_once(case.parallel, lambda _i: _post(f"http://127.0.0.1:{port}/v1/completions", body))
        return peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def peer_peak(main: Path, case: Case, args: argparse.Namespace, ids: Sequence[int]) -> int:
    """Start llama-server with the case's settings, send the same requests, return its peak RSS."""
    peer = LlamaServerPeer(args.llama_server, PeerSettings(
        main=main, draft=case.draft, ctx_size=args.ctx_size, threads=args.threads or (os.cpu_count() or 1),
        cache_type_k="f16", cache_type_v="f16", parallel=case.parallel))
    try:
        peer.start()
        _at_once(case.parallel, lambda _i: peer.complete(ids, args.max_tokens, timeout=REQUEST_TIMEOUT))
        assert peer.proc is not None
        return peak_rss(peer.proc.pid)
    finally:
        peer.close()


def measure(main: Path, case: Case, args: argparse.Namespace) -> Result:
    share = args.ctx_size // case.parallel // 64 * 64
    n = min(args.prompt_tokens, share - args.max_tokens - 1)
    opts = ModelOptions(model=str(main), draft=str(case.draft) if case.draft else "none", ctx_size=args.ctx_size,
                        parallel=case.parallel, threads=args.threads)
    plan = plan_for(opts, main, case.draft)
    ids = prompt_ids(main, n)
    tandem = tandem_peak(main, case, args, ids)
    peer = peer_peak(main, case, args, ids) if args.llama_server else None
    return Result(case, n, plan.total, plan.total - plan.process, tandem, peer)


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.0f}"


def markdown(results: list[Result], ctx: int) -> str:
    out = [f"Peak RSS (MiB), --ctx-size {ctx} (-c {ctx}), each request's prompt filling its share:", "",
           "| parallel | draft | prompt tokens per request | plan: models | plan: Tandem total | Tandem peak RSS "
           "| plan vs Tandem | llama-server peak RSS | Tandem / llama-server |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.tandem / r.peer:.2f}x" if r.peer else "n/a"
        out.append(f"| {r.case.parallel} | {r.case.draft.stem if r.case.draft else 'none'} | {r.prompt_tokens:,} "
                   f"| {mib(r.plan_models)} | {mib(r.plan_total)} | {mib(r.tandem)} "
                   f"| {(r.plan_total - r.tandem) / r.tandem:+.1%} | {mib(r.peer)} | {ratio} |")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    main_path = one_main(args)
    draft = draft_file(args)
    results = []
    for n in args.parallel:
        for d in args.drafts:
            r = measure(main_path, Case(n, draft if d == "draft" else None), args)
            print(f"parallel {n}, draft {d}, {r.prompt_tokens} prompt tokens: Tandem {mib(r.tandem)} MiB, llama-server {mib(r.peer)} MiB, "
                  f"plan {mib(r.plan_total)} MiB", file=sys.stderr, flush=True)
            results.append(r)
    print(markdown(results, args.ctx_size))
    return 0
