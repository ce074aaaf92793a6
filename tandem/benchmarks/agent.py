"""An agent's conversation through /v1/messages (Anthropic's Messages API): the time to first token of each turn.

What a coding agent (Claude Code and the like) sends: a long system prompt (about --prompt-tokens tokens with the
tools and the template: agent rules, the tools' guidance, and source files of this repository as the open files),
four tools, a task, then --round-trips tool round trips. Each turn forces a call (tool_choice any, one call a turn),
greedy, at most --max-tokens tokens; the call's tool_result (--result-lines lines of a repository file, the same
text for every server whatever it called) and the next turn follow. So turn 1 decodes the whole prompt and every
later turn only what was added since: a server whose prompt cache holds the conversation answers the later turns
at about the first turn's time to first token or faster, one that decodes the prompt again grows slower every turn.

Servers, one after another, each in a process of its own on loopback: `tandem serve` (--model, --draft if given,
--parallel 1) and, with --llama-server PATH, llama-server -np 1 with the same model, context and threads, --jinja
(its tool-call templates), its prompt cache on as by default, f16 KV and flash attention off as Tandem's contexts.
Each server first answers one warm-up request (another system prompt, the same tools) so that one-time costs (a
grammar's tokenizer tables) do not count in turn 1.

Times are wall clock as the client sees them, streamed: TTFT is the time to the first content_block_delta (Tandem
sends a call whole once it is parsed, so its TTFT includes writing the call; llama-server streams the call's
arguments as they come), start the time to message_start (both send it once the prompt is decoded and the first
token is out), total the time to the end of the stream. Pass criterion: every later turn's TTFT at most 1.5x the
first turn's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

import tandem
from tandem.benchmarks.common import positive_int
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.errors import BadInputError
from tandem.testing.serve_process import ServeProcess

HELP = "an agent's tool round trips through /v1/messages: time to first token per turn, vs llama-server"
"""One line for `tandem bench --help`."""

LIMIT = 1.5
"""Pass criterion: every later turn's time to first token at most this times the first turn's."""
_PATH = {"type": "string", "maxLength": 120, "description": "A path relative to the repository root"}
TOOLS = (
    {"name": "list_files", "description": "List the files and folders of a folder of the repository, one per line, "
                                          "folders ending in '/'. Use it to find where code lives before reading.",
     "input_schema": {"type": "object", "properties": {"path": _PATH}, "required": ["path"]}},
    {"name": "read_file", "description": "Read a text file of the repository. Lines come numbered; read a file "
                                         "before you reason about its code, and never guess its content.",
     "input_schema": {"type": "object", "properties": {"path": _PATH}, "required": ["path"]}},
    {"name": "search_code", "description": "Search the repository's code for a regular expression; every matching "
                                           "line comes back as path:line: text.",
     "input_schema": {"type": "object", "properties": {
         "pattern": {"type": "string", "maxLength": 80, "description": "A Python regular expression"}},
         "required": ["pattern"]}},
    {"name": "run_tests", "description": "Run pytest on a test file or one test (path::name) and return its "
                                         "output: the failures with their tracebacks, then the summary line.",
     "input_schema": {"type": "object", "properties": {
         "target": {"type": "string", "maxLength": 120, "description": "tests/test_x.py or tests/test_x.py::test_y"}},
         "required": ["target"]}},
)
"""Anthropic tool objects; the strings are bounded so that a forced call always fits a modest --max-tokens."""
RULES = """You are a coding agent working in the Python repository of Tandem, a local LLM server. You work in turns:
each turn you call exactly one tool, read its result in the next message, and decide the next step.

Rules:
- Read code before you change it or reason about it; never guess what a file holds.
- Prefer search_code to find where a name is defined or used, then read_file to see it in full.
- Keep the user's code style: docstrings say what and why, errors name a cause and a fix.
- Run the tests that cover what you touched with run_tests, and read their output before you answer.
- Never run commands that change files outside the repository, and never touch the network.
- When a tool fails, read its error and fix the call instead of repeating it.

The files the user has open follow, with their paths."""
TASK = ("A user reports that streamed answers sometimes end with a partial stop string, while the same request "
        "without streaming ends cleanly. Find where stop strings are handled, read the code, and run the tests that "
        "cover it. Call one tool at a time.")
OPEN_FILES = ("spec/generate.py", "spec/stats.py", "tools.py", "server/responses.py", "server/messages_out.py",
              "spec/verify.py")
"""Source files (under the tandem package) that fill the system prompt, in order, as far as the budget goes."""
RESULT_FILES = ("tools.py", "spec/stats.py", "server/responses.py", "tool_grammar.py", "server/messages_out.py",
                "benchmarks/common.py")
"""The file each round trip's tool_result shows (cycled), numbered lines from a turn-dependent offset."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, metavar="GGUF", help="main model (both servers)")
    p.add_argument("--draft", default=None, metavar="GGUF|none",
                   help="Tandem's draft model, or none (default: what `tandem serve --model` picks alone)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads; 0 means all cores (default: 0)")
    p.add_argument("--ctx-size", type=positive_int, default=16384,
                   help="context size of each server (default: 16384; the defaults reach about 7000 tokens)")
    p.add_argument("--prompt-tokens", type=positive_int, default=3000,
                   help="first turn's prompt (system prompt, tools, task), in the model's tokens (default: 3000)")
    p.add_argument("--round-trips", type=positive_int, default=5,
                   help="tool round trips (default: 5): one turn more than this is timed")
    p.add_argument("--result-lines", type=positive_int, default=40, help="lines of each tool_result (default: 40)")
    p.add_argument("--max-tokens", type=positive_int, default=96, help="tokens per turn at most (default: 96)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server at PATH (-np 1, --jinja, its prompt cache) with the same model")
    p.add_argument("--json", type=Path, default=Path("bench/out/agent.json"), metavar="FILE",
                   help="JSON results (default: bench/out/agent.json)")


# -- the conversation -----------------------------------------------------------------------------------------
def _source(rel: str) -> list[str]:
    return (Path(tandem.__file__).parent / rel).read_text().splitlines()


def system_prompt(chars: int) -> str:
    """The agent's rules, then the open files' lines (whole lines, in order) up to about `chars` characters."""
    parts, left = [RULES], chars
    for rel in OPEN_FILES:
        if left <= 0:
            break
        taken = []
        for line in _source(rel):
            if left <= 0:
                break
            taken.append(line)
            left -= len(line) + 1
        parts.append(f"\n# tandem/{rel}\n```python\n" + "\n".join(taken) + "\n```")
    return "\n".join(parts)


def tool_result(turn: int, lines: int) -> str:
    """Round trip `turn`'s result: `lines` numbered lines of one repository file (the same for every server)."""
    rel = RESULT_FILES[turn % len(RESULT_FILES)]
    text = _source(rel)
    start = (turn * 37) % max(1, len(text) - lines)
    body = [f"{i + 1:5d}  {text[i % len(text)]}" for i in range(start, start + lines)]
    return f"tandem/{rel}, lines {start + 1}-{start + lines}:\n" + "\n".join(body)


@dataclass
class Turn:
    """One streamed turn as the client saw it."""

    ttft_s: float = 0.0
    """To the first content_block_delta."""
    start_s: float = 0.0
    """To message_start."""
    total_s: float = 0.0
    """To the end of the stream."""
    input_tokens: int = 0
    """Prompt tokens decoded for this turn."""
    cached_tokens: int = 0
    """Prompt tokens the server's cache already held (cache_read_input_tokens)."""
    output_tokens: int = 0
    calls: list[dict] = field(default_factory=list)
    """The tool_use blocks: {id, name, input}."""
    text: str = ""


def _usage(turn: Turn, usage: dict | None) -> None:
    usage = usage or {}
    if usage.get("input_tokens") or usage.get("cache_read_input_tokens"):
        turn.input_tokens = int(usage.get("input_tokens", 0))
        turn.cached_tokens = int(usage.get("cache_read_input_tokens") or 0)
    turn.output_tokens = int(usage.get("output_tokens") or turn.output_tokens)


def stream_turn(http: httpx.Client, url: str, body: dict, who: str) -> Turn:
    """One streamed /v1/messages request: its times, usage and blocks."""
    turn, inputs, t0 = Turn(), {}, time.perf_counter()
    with http.stream("POST", f"{url}/v1/messages", json={**body, "stream": True},
                     headers={"anthropic-version": "2023-06-01"}) as r:
        if r.status_code != 200:
            raise BadInputError(f"{who} answered /v1/messages with {r.status_code}: {r.read().decode()[:300]}",
                                "check the server's log and the bench's options")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            kind, now = ev.get("type"), time.perf_counter() - t0
            if kind == "message_start":
                turn.start_s = now
                _usage(turn, ev["message"].get("usage"))
            elif kind == "content_block_start" and ev["content_block"]["type"] == "tool_use":
                block = ev["content_block"]
                turn.calls.append({"id": block["id"], "name": block["name"]})
                inputs[ev["index"]] = [len(turn.calls) - 1, ""]
            elif kind == "content_block_delta":
                turn.ttft_s = turn.ttft_s or now
                delta = ev["delta"]
                if delta.get("type") == "input_json_delta" and ev["index"] in inputs:
                    inputs[ev["index"]][1] += delta.get("partial_json", "")
                elif delta.get("type") == "text_delta":
                    turn.text += delta.get("text", "")
            elif kind == "message_delta":
                _usage(turn, ev.get("usage"))
            elif kind == "error":
                raise BadInputError(f"{who} ended a stream with an error: {ev.get('error')}", "check its log")
    turn.total_s = time.perf_counter() - t0
    for i, text in inputs.values():
        turn.calls[i]["input"] = json.loads(text) if text.strip() else {}
    return turn


def converse(url: str, model: str, system: str, args: argparse.Namespace, who: str, log) -> list[Turn]:
    """A warm-up request, then the conversation: --round-trips + 1 turns, each forcing one call."""
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "top_k": 1, "tools": list(TOOLS),
              "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    messages: list[dict] = [{"role": "user", "content": TASK}]
    turns: list[Turn] = []
    # a new connection per request: llama-server may close one after a stream, which a reused one meets as an error
    with httpx.Client(timeout=1800, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        stream_turn(http, url, {**common, "system": "You are a helpful assistant.", "messages": [
            {"role": "user", "content": "List the files of the tests folder."}]}, who)
        for k in range(args.round_trips + 1):
            turn = stream_turn(http, url, {**common, "system": system, "messages": messages}, who)
            turns.append(turn)
            log(f"  turn {k + 1}: TTFT {turn.ttft_s:.2f} s, total {turn.total_s:.2f} s, "
                f"{turn.cached_tokens} cached + {turn.input_tokens} new prompt tokens, "
                f"{turn.calls[0]['name'] if turn.calls else f'NO CALL (text {turn.text[:60]!r})'}")
            result = tool_result(k, args.result_lines)
            if not turn.calls:  # (llama-server's forced calls may come after text: none within --max-tokens)
                messages.append({"role": "assistant", "content": turn.text or "(nothing)"})
                messages.append({"role": "user", "content": f"Tool output:\n{result}"})
                continue
            messages.append({"role": "assistant", "content": [{"type": "tool_use", **c} for c in turn.calls]})
            results = [result] + ["(no output)"] * (len(turn.calls) - 1)
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": c["id"], "content": r}
                                                         for c, r in zip(turn.calls, results)]})
    return turns


def size_system(url: str, model: str, target: int) -> tuple[str, int]:
    """The system prompt whose first turn (tools and task included) is about `target` tokens by the model's own
    count (/v1/messages/count_tokens); and that count."""
    def count(chars: int) -> int:
        body = {"model": model, "system": system_prompt(chars), "tools": list(TOOLS),
                "messages": [{"role": "user", "content": TASK}]}
        r = httpx.post(f"{url}/v1/messages/count_tokens", json=body, timeout=120)
        r.raise_for_status()
        return int(r.json()["input_tokens"])
    fixed, chars = count(0), target * 3
    for _ in range(3):  # code runs ~3-4 characters a token; two corrections land within a few tokens
        n = count(chars)
        if abs(n - target) <= max(8, target // 100) or n <= fixed:
            break
        chars = max(0, round(chars * (target - fixed) / (n - fixed)))
    return system_prompt(chars), count(chars)


# -- the servers ------------------------------------------------------------------------------------------------
def run_tandem(args: argparse.Namespace, log) -> tuple[str, int, str, list[Turn]]:
    """(system prompt, its first turn's tokens, draft, turns) of `tandem serve`."""
    argv = ["--model", str(args.model), "--ctx-size", str(args.ctx_size), "--threads", str(args.threads),
            "--parallel", "1", "--port", "0", *(["--draft", str(args.draft)] if args.draft else [])]
    server = ServeProcess(argv).start()
    try:
        info = httpx.get(f"{server.url}/health", timeout=30).json()["model"]
        system, tokens = size_system(server.url, info["id"], args.prompt_tokens)
        draft = str(info.get("draft_model") or "none") + (" (paused)" if info.get("draft_paused") else "")
        log(f"tandem serve (draft {draft}): first prompt {tokens} tokens")
        return system, tokens, draft, converse(server.url, info["id"], system, args, "tandem serve", log)
    finally:
        server.stop()


def run_peer(args: argparse.Namespace, system: str, log) -> list[Turn]:
    settings = PeerSettings(main=args.model, ctx_size=args.ctx_size, threads=args.threads or os.cpu_count() or 2,
                            cache_type_k="f16", cache_type_v="f16", parallel=1, extra=("--jinja",))
    peer = LlamaServerPeer(args.llama_server, settings, name="llama-server")
    try:
        peer.start()
        log("llama-server -np 1 --jinja")
        return converse(f"http://127.0.0.1:{peer.port}", "agent", system, args, "llama-server", log)
    finally:
        peer.close()


# -- the report -----------------------------------------------------------------------------------------------
def ratios(turns: list[Turn]) -> list[float]:
    """Each turn's TTFT over the first turn's."""
    first = turns[0].ttft_s or 1e-9
    return [t.ttft_s / first for t in turns]


def verdict(turns: list[Turn]) -> tuple[bool, float]:
    """(every later turn at most LIMIT x the first, the worst later turn's ratio)."""
    worst = max(ratios(turns)[1:], default=1.0)
    return worst <= LIMIT, worst


def table(results: dict[str, list[Turn]]) -> Table:
    t = Table(box=box.MARKDOWN)
    t.add_column("turn", justify="right")
    for who in results:
        for col in ("prompt cached + new", "TTFT s", "/ turn 1", "start s", "total s"):
            t.add_column(f"{who} {col}", justify="right")
    for k in range(max(len(v) for v in results.values())):
        row = [str(k + 1)]
        for turns in results.values():
            x, r = turns[k], ratios(turns)[k]
            row += [f"{x.cached_tokens} + {x.input_tokens}", f"{x.ttft_s:.2f}", f"{r:.2f}x", f"{x.start_s:.2f}",
                    f"{x.total_s:.2f}"]
        t.add_row(*row)
    return t


def main(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        raise BadInputError(f"--model {args.model} does not exist", "pass an existing GGUF file to --model")
    if args.llama_server is not None and not args.llama_server.is_file():
        raise BadInputError(f"llama-server binary {args.llama_server} does not exist",
                            "build it (cmake --build BUILD --target llama-server) or drop --llama-server")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    system, tokens, draft, turns = run_tandem(args, log)
    results = {"tandem": turns}
    if args.llama_server is not None:
        results["llama-server"] = run_peer(args, system, log)
    Console(file=sys.stdout, width=240).print(table(results))
    out: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(args.model), "draft": draft,
                 "first_prompt_tokens": tokens, "system_chars": len(system),
                 "system_sha256": hashlib.sha256(system.encode()).hexdigest(), "round_trips": args.round_trips,
                 "result_lines": args.result_lines, "max_tokens": args.max_tokens, "limit": LIMIT, "servers": {}}
    for who, turns in results.items():
        ok, worst = verdict(turns)
        print(f"{who}: {'PASS' if ok else 'FAIL'}: every later turn's TTFT <= {LIMIT}x the first turn's "
              f"(worst {worst:.2f}x, first {turns[0].ttft_s:.2f} s)")
        missing = [k + 1 for k, t in enumerate(turns) if not t.calls]
        if missing:
            print(f"{who}: no tool call in turn(s) {missing} (the conversation went on with its text and the result)")
        out["servers"][who] = {"pass": ok, "worst_ratio": round(worst, 3), "turns_without_call": missing, "turns": [
            {**asdict(replace(t, text=t.text[:200])), "turn": k + 1, "ratio": round(r, 3)}
            for k, (t, r) in enumerate(zip(turns, ratios(turns)))]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0
