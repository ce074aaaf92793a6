"""Fuzz the HTTP API from its own OpenAPI document (GET /openapi.json) with schemathesis.

A `tandem serve` on the tiny test models (or --model/--draft) is started as a child process with a small
context. For every operation of the document, schemathesis generates requests that fit the schema (positive)
and requests that break it (negative), --examples of each, and sends them with the API key. Every response
must: not be a 5xx; come within --timeout seconds; if a 4xx, carry OpenAI's error body
({"error": {"message", "type", "param", "code"}}); match the status codes, media types and schemas the
document declares; refuse requests that break the schema; and, when streamed, be server-sent events that
end with [DONE] or an error event. Every path is also sent the methods it does not have, which must get a
405 with OpenAI's error body and an Allow header ("other methods"). The table counts requests by operation
and status; every failure is printed with the request that caused it, and the command exits 1 if there was
any. The API has no resources to create and link, so there is no stateful phase.

schemathesis comes with the test extra: pip install -e '.[test]'.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tandem.benchmarks.common import positive_int
from tandem.errors import BadInputError
from tandem.testing.serve import ServeProcess

HELP = "fuzz the HTTP API from its OpenAPI schema (schemathesis): requests sent and statuses, failures"
"""One line for `tandem bench --help`."""

KEY = "fuzz-key"
"""The API key the fuzzed server requires (and every request sends)."""


@dataclass
class FuzzReport:
    """What one fuzzing run sent and found."""

    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    """Requests by (operation, generation mode, HTTP status); status 0: no response (timeout, connection)."""
    failures: list[str] = field(default_factory=list)
    """One entry per failed response: the checks that failed and a curl command that repeats the request."""

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def table(self) -> str:
        """Markdown: requests by operation and status, positive and negative together."""
        ops = sorted({op for op, _, _ in self.statuses})
        codes = sorted({s for _, _, s in self.statuses})
        head = "| operation | requests | " + " | ".join(str(c) for c in codes) + " |"
        lines = [head, "|---|---:|" + "---:|" * len(codes)]
        for op in ops:
            by = Counter({s: n for (o, _, s), n in self.statuses.items() if o == op})
            lines.append(f"| `{op}` | {sum(by.values())} | " + " | ".join(str(by[c] or "") for c in codes) + " |")
        total = Counter()
        for (_, _, s), n in self.statuses.items():
            total[s] += n
        lines.append(f"| all | {self.requests} | " + " | ".join(str(total[c]) for c in codes) + " |")
        return "\n".join(lines)


def openai_error_body(response) -> str | None:  # type: ignore[no-untyped-def]
    """Why a 4xx/5xx response lacks OpenAI's error body (None: it has it)."""
    try:
        body = response.json()
    except ValueError:
        return f"the {response.status_code} body is not JSON: {response.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(body) != {"error"} or set(err) != {"message", "type", "param", "code"}:
        return f"the {response.status_code} body is not OpenAI's error body: {json.dumps(body)[:300]}"
    if not isinstance(err["message"], str) or not err["message"]:
        return f"the {response.status_code} error has no message: {json.dumps(body)[:300]}"
    return None


def stream_problem(text: str) -> str | None:
    """Why a text/event-stream body is not a well-formed completion stream (None: it is)."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    if not events:
        return "the stream is empty"
    for ev in events[:-1]:
        try:
            json.loads(ev)
        except ValueError:
            return f"a stream event is not JSON: {ev[:200]!r}"
    if events[-1] == "[DONE]":
        return None
    try:
        last = json.loads(events[-1])
    except ValueError:
        return f"the stream ends with {events[-1][:200]!r}, neither [DONE] nor an error event"
    return None if isinstance(last, dict) and "error" in last else "the stream ends without [DONE] or an error event"


def fuzz(url: str, *, examples: int, timeout: float = 60.0, seed: int | None = 0,
         key: str | None = KEY) -> FuzzReport:
    """Fuzz every operation of the server at `url`: `examples` positive and `examples` negative requests each.

    seed 0 (the default) generates the same requests every run, for CI; None draws new ones.
    """
    try:
        import schemathesis
    except ImportError as e:
        raise BadInputError("schemathesis is not installed", "install the test extra: pip install -e '.[test]'") from e
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    report = FuzzReport()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            send = _sender(report, url, headers, timeout, checks, label, mode.value)
            run = settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
                           phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(
                given(op.as_strategy(generation_mode=mode))(send))
            if seed not in (0, None):
                from hypothesis import seed as hypothesis_seed
                run = hypothesis_seed(seed)(run)
            try:
                run()
            except Unsatisfiable:  # negative mode on an operation without parameters: nothing to break
                continue
    _other_methods(report, url, schema.raw_schema, headers, timeout)
    return report


_METHODS = ("get", "post", "put", "patch", "delete")


def _other_methods(report: FuzzReport, url: str, doc: dict, headers: dict[str, str], timeout: float) -> None:
    """Every path with each method it does not have: a 405 with OpenAI's error body and the Allow header."""
    import httpx
    for path, ops in doc.get("paths", {}).items():
        concrete = path.replace("{model_id}", "x")
        for method in _METHODS:
            if method in ops:
                continue
            r = httpx.request(method.upper(), f"{url}{concrete}", headers=headers, timeout=timeout)
            report.statuses[("other methods", "negative", r.status_code)] += 1
            problems = [why] if (why := openai_error_body(r)) else []
            if r.status_code != 405 or "allow" not in r.headers:
                problems.append(f"expected 405 with an Allow header, got {r.status_code} {dict(r.headers)}")
            if problems:
                report.failures.append(f"{method.upper()} {concrete} -> {r.status_code}: " + "\n".join(problems))


def _sender(report: FuzzReport, url: str, headers: dict[str, str], timeout: float, checks: list, label: str,
            mode: str):  # type: ignore[no-untyped-def]
    """The hypothesis test body: send one generated case, count its status, record what failed."""

    from schemathesis.core.failures import FailureGroup

    def send(case) -> None:  # type: ignore[no-untyped-def]
        try:
            response = case.call(base_url=url, headers=headers, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a hang or a dropped connection is what fuzzing looks for
            report.statuses[(label, mode, 0)] += 1
            report.failures.append(f"{label} ({mode}): no response within {timeout:g} s: "
                                   f"{type(e).__name__}: {e}\n{case.as_curl_command(headers=headers)}")
            return
        report.statuses[(label, mode, response.status_code)] += 1
        problems = []
        if response.status_code >= 400 and (why := openai_error_body(response)):
            problems.append(why)
        if "event-stream" in response.headers.get("content-type", "") and (why := stream_problem(response.text)):
            problems.append(why)
        try:
            case.validate_response(response, checks=checks, headers=headers,
                                   transport_kwargs={"base_url": url, "headers": headers, "timeout": timeout})
        except FailureGroup as e:  # every check that failed
            problems.append(str(e).strip())
        if problems:
            report.failures.append(f"{label} ({mode}) -> {response.status_code}: "
                                   + "\n".join(problems) + f"\n{case.as_curl_command(headers=headers)}")

    return send


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=positive_int, default=200,
                   help="requests per operation and mode, positive (fits the schema) and negative (default: 200)")
    p.add_argument("--model", type=Path, default=None, metavar="GGUF",
                   help="main model (default: the tiny test model, built in a temporary folder)")
    p.add_argument("--draft", type=Path, default=None, metavar="GGUF",
                   help="draft model (default: the tiny test draft with --model unset, else none)")
    p.add_argument("--ctx-size", type=positive_int, default=128,
                   help="the server's context: generations without max_tokens run until it is full (default: 128)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a response may take (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="0: the same requests every run; another: other requests")


def fuzz_server(model: Path, draft: Path | None, ctx_size: int, home: Path) -> ServeProcess:
    """`tandem serve` for fuzzing, not started: these models only (an empty models folder in `home`), the API
    key KEY, a small context so that generations without max_tokens end soon, and short drafts (a seeded
    request at temperature > 0 drafts at every step, with a fixed length, whatever the acceptance)."""
    env = {**os.environ, "TANDEM_MODELS_DIR": str(home / "models"), "TANDEM_CONFIG": str(home / "models.toml")}
    return ServeProcess(["--model", str(model), "--draft", str(draft) if draft else "none", "--ctx-size",
                         str(ctx_size), "--draft-max", "4", "--threads", "1", "--port", "0", "--api-key", KEY,
                         "--no-pause-slow-draft"],
                        env=env)


def main(args: argparse.Namespace) -> int:
    from tandem.testing.tiny import build_fixture_set
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            tiny = build_fixture_set(Path(tmp) / "tiny")
            model, draft = tiny["main"], args.draft or tiny["draft_close"]
        else:
            model, draft = args.model, args.draft
        with fuzz_server(model, draft, args.ctx_size, Path(tmp)) as server:
            report = fuzz(server.url, examples=args.examples, timeout=args.timeout, seed=args.seed)
    print(f"{report.requests} requests to {model.name} + {draft.name if draft else 'no draft'}, "
          f"--examples {args.examples} (positive and negative per operation), seed {args.seed}\n")
    print(report.table())
    print(f"\n{len(report.failures)} failures")
    for f in report.failures:
        print(f"\n{f}")
    return 1 if report.failures else 0
