"""Bad input: each case gets the right 4xx with an OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from test_server_support import (RUNTIME_SPEC, TEST_KEY, assert_openai_error, client, metrics, model_options, sample,
                                 start, tiny_app, wait_ready)

from tandem.config import ModelOptions, SpecOptions
from tandem.errors import IncompatibleDraftError
from tandem.runtime import Runtime
from tandem.server import ServerOptions, create_app
from tandem.server.errors import error_response, to_tandem_error
from tandem.server.serving import ServerThread

LIMIT = 64 * 1024
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    srv = start(tiny_app(tiny, ctx=256, max_body_bytes=LIMIT))
    yield srv
    srv.stop()


@dataclass
class Case:
    status: int
    body: Any = None
    """A JSON body (dict/list), or raw bytes."""
    param: str | None = None
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    code: str | None = None


def chat(**kw: Any) -> dict:
    return {"messages": MSG, **kw}


def text(**kw: Any) -> dict:
    return {"prompt": "Once upon a time", **kw}


def _cases(tiny_paths: dict) -> dict[str, Case]:
    return {
        # -- the body itself
        "malformed-json": Case(400, b'{"messages": [', code="invalid_json"),
        "body-not-object": Case(400, b"[1, 2]", code="invalid_json"),
        "empty-body": Case(400, b""),
        "body-too-large": Case(413, chat(pad="x" * (LIMIT + 10)), code="body_too_large"),
        # -- messages
        "messages-missing": Case(400, {"max_tokens": 3}, "messages"),
        "messages-empty": Case(400, {"messages": []}, "messages"),
        "messages-not-list": Case(400, {"messages": "hi"}, "messages"),
        "message-not-object": Case(400, {"messages": [5]}, "messages[0]"),
        "unknown-role": Case(400, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        "content-wrong-type": Case(400, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        "content-null": Case(400, {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        "content-missing": Case(400, {"messages": [{"role": "user"}]}, "messages[0].content"),
        "system-content-null": Case(400, {"messages": [{"role": "system", "content": None},
                                                       {"role": "user", "content": "hi"}]}, "messages[0].content"),
        "assistant-content-null": Case(400, {"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": None},
                                                          {"role": "user", "content": "and?"}]}, "messages[1].content"),
        "content-image-part": Case(400, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        "prompt-over-context": Case(400, {"messages": [{"role": "user", "content": "hello " * 300}]},
                                    "messages", code="context_length_exceeded"),
        # -- a wrong type or value for every generation field
        "max_tokens-negative": Case(400, chat(max_tokens=-5), "max_tokens"),
        "max_tokens-zero": Case(400, chat(max_tokens=0), "max_tokens"),
        "max_tokens-string": Case(400, chat(max_tokens="10"), "max_tokens"),
        "max_tokens-float": Case(400, chat(max_tokens=10.5), "max_tokens"),
        "max_completion_tokens-negative": Case(400, chat(max_completion_tokens=-1), "max_completion_tokens"),
        "temperature-negative": Case(400, chat(temperature=-1), "temperature"),
        "temperature-string": Case(400, chat(temperature="hot"), "temperature"),
        "temperature-too-high": Case(400, chat(temperature=3), "temperature"),
        "top_p-zero": Case(400, chat(top_p=0), "top_p"),
        "top_p-string": Case(400, chat(top_p="x"), "top_p"),
        "top_k-negative": Case(400, chat(top_k=-1), "top_k"),
        "top_k-float": Case(400, chat(top_k=1.5), "top_k"),
        "min_p-too-high": Case(400, chat(min_p=2), "min_p"),
        "seed-string": Case(400, chat(seed="abc"), "seed"),
        "seed-negative": Case(400, chat(seed=-1), "seed"),
        "stop-number": Case(400, chat(stop=5), "stop"),
        "stop-list-of-numbers": Case(400, chat(stop=[1]), "stop[0]"),
        "stream-string": Case(400, chat(stream="yes"), "stream"),
        "stream_options-without-stream": Case(400, chat(stream_options={"include_usage": True})),
        "include_usage-string": Case(400, chat(stream=True, stream_options={"include_usage": "yes"}),
                                     "stream_options.include_usage"),
        "n-two": Case(400, chat(n=2), "n"),
        "n-string": Case(400, chat(n="1"), "n"),
        "model-number": Case(400, chat(model=5), "model"),
        "draft_model-number": Case(400, chat(draft_model=5), "draft_model"),
        "draft_max-negative": Case(400, chat(draft_max=-1), "draft_max"),
        "draft_max-string": Case(400, chat(draft_max="8"), "draft_max"),
        "draft_min-over-draft_max": Case(400, chat(draft_min=5, draft_max=2)),
        "draft_p_min-too-high": Case(400, chat(draft_p_min=1.5), "draft_p_min"),
        "draft_policy-unknown": Case(400, chat(draft_policy="bogus"), "draft_policy"),
        "return_token_sources-string": Case(400, chat(return_token_sources="yes"), "return_token_sources"),
        "tool-parameters-not-object": Case(400, chat(tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "array"}}}]), "tools[0].function.parameters"),
        "tool-parameters-bad-property": Case(400, chat(tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": 5}}}}]), "tools[0].function.parameters"),
        "tool-type-unknown": Case(400, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
        "tool-name-bad": Case(400, chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
                              "tools[0].function.name"),
        "tool_choice-unknown-function": Case(400, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                       tool_choice={"type": "function", "function": {"name": "g"}})),
        "tool_choice-bogus": Case(400, chat(tool_choice="always"), "tool_choice"),
        "tool-message-without-id": Case(400, chat(messages=[{"role": "user", "content": "x"},
                                                            {"role": "tool", "content": "42"}]), "messages[1].tool_call_id"),
        "logprobs-number": Case(400, chat(logprobs=1), "logprobs"),
        "top_logprobs-without-logprobs": Case(400, chat(top_logprobs=3), "top_logprobs"),
        "top_logprobs-too-many": Case(400, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        "presence_penalty-too-high": Case(400, chat(presence_penalty=2.5), "presence_penalty"),
        "frequency_penalty-too-low": Case(400, chat(frequency_penalty=-3), "frequency_penalty"),
        "repeat_penalty-zero": Case(400, chat(repeat_penalty=0), "repeat_penalty"),
        "repeat_last_n-too-low": Case(400, chat(repeat_last_n=-2), "repeat_last_n"),
        "logit_bias-bad-key": Case(400, chat(logit_bias={"hello": 5}), "logit_bias"),
        "logit_bias-too-large": Case(400, chat(logit_bias={"5": 101}), "logit_bias"),
        "logit_bias-not-a-number": Case(400, chat(logit_bias={"5": "1"}), "logit_bias"),
        "logit_bias-out-of-vocab": Case(400, chat(logit_bias={"999999999": 1}), "logit_bias"),
        "response_format-unsupported": Case(400, chat(response_format={"type": "xml"}), "response_format.type"),
        "response_format-bad-schema": Case(400, chat(response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "strin"}}}), "response_format.json_schema.schema"),
        "grammar-does-not-compile": Case(400, chat(grammar="root ::= \"a"), "grammar"),
        # -- names that cannot be used
        "unknown-model": Case(404, chat(model="gpt-4"), "model", code="model_not_found"),
        "unknown-draft": Case(404, chat(draft_model="no-such-draft"), "draft_model", code="model_not_found"),
        "incompatible-draft": Case(422, chat(draft_model=str(tiny_paths["different_vocab"])), "draft_model",
                                   code="incompatible_draft"),
        "draft-not-gguf": Case(400, chat(draft_model=__file__)),
        # -- text completions
        "prompt-missing": Case(400, {"max_tokens": 3}, "prompt", path=TEXT),
        "prompt-number": Case(400, text(prompt=5), "prompt", path=TEXT),
        "prompt-batch": Case(400, text(prompt=["a", "b"]), "prompt", path=TEXT),
        "prompt-empty-list": Case(400, text(prompt=[]), "prompt", path=TEXT),
        "prompt-token-out-of-vocab": Case(400, text(prompt=[1, 999_999_999]), "prompt", path=TEXT),
        "prompt-tokens-over-context": Case(400, text(prompt=[1] * 300), "prompt",
                                           code="context_length_exceeded", path=TEXT),
        "echo-unsupported": Case(400, text(echo=True), path=TEXT),
        "best_of-unsupported": Case(400, text(best_of=3), path=TEXT),
        "text-logprobs-too-many": Case(400, text(logprobs=6), "logprobs", path=TEXT),
        "text-logprobs-bool": Case(400, text(logprobs=True), "logprobs", path=TEXT),
        "text-unknown-model": Case(404, text(model="davinci"), "model", path=TEXT),
        # -- authentication and routing
        "no-api-key": Case(401, chat(), headers={}, code="missing_api_key"),
        "wrong-api-key": Case(401, chat(), headers={"Authorization": "Bearer wrong"}, code="invalid_api_key"),
        "wrong-auth-scheme": Case(401, chat(), headers={"Authorization": f"Basic {TEST_KEY}"}),
        "models-without-key": Case(401, None, path="/v1/models", method="GET", headers={}),
        "unknown-route": Case(404, chat(), path="/v1/nope"),
        "wrong-method": Case(405, None, path=CHAT, method="GET"),
    }


CASE_IDS = list(_cases({"different_vocab": "x"}))


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input(server, tiny, name):
    case = _cases(tiny)[name]
    kw: dict[str, Any] = {"headers": case.headers}
    if isinstance(case.body, bytes):
        kw["content"] = case.body
        kw["headers"] = {**case.headers, "Content-Type": "application/json"}
    elif case.body is not None:
        kw["json"] = case.body
    r = httpx.request(case.method, f"{server.url}{case.path}", timeout=30, **kw)
    err = assert_openai_error(r, case.status, case.param)
    if case.code is not None:
        assert err["code"] == case.code, err
    if case.status == 401:
        assert err["type"] == "authentication_error"
    # The server is unharmed: the next good request succeeds.
    with client(server) as c:
        ok = c.post(CHAT, json={"messages": MSG, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2


def test_at_least_25_cases():
    assert len(CASE_IDS) >= 25


def test_streamed_body_over_the_limit(server):
    """No Content-Length (chunked upload): the limit is enforced as the body streams in."""
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}]}'

    with client(server) as c:
        r = c.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    err = assert_openai_error(r, 413)
    assert str(LIMIT) in err["message"] and "--max-body-bytes" in err["message"]


def test_body_just_under_the_limit_is_accepted(server):
    body = json.dumps({"messages": MSG, "max_tokens": 1, "pad": ""})
    pad = "x" * (LIMIT - len(body))
    with client(server) as c:
        r = c.post(CHAT, content=json.dumps({"messages": MSG, "max_tokens": 1, "pad": pad}),
                   headers={"Content-Type": "application/json"})
    assert len(r.request.content) == LIMIT
    assert r.status_code == 200, r.text


def test_error_messages_name_cause_and_fix(server, tiny):
    with client(server) as c:
        err = c.post(CHAT, json=chat(model="gpt-4")).json()["error"]
        assert tiny["main"].stem in err["message"] and "/v1/models" in err["message"]
        err = c.post(CHAT, json={"messages": [{"role": "user", "content": "hello " * 300}]}).json()["error"]
        assert "256" in err["message"] and "--ctx-size" in err["message"]
        err = c.post(CHAT, json=chat(draft_model="no-such-draft")).json()["error"]
        assert tiny["draft_close"].stem in err["message"] and "none" in err["message"]
        err = c.post(CHAT, json=chat(temperature=-1)).json()["error"]
        assert "temperature" in err["message"] and "-1" in err["message"]


def test_error_statuses_are_counted(server):
    before = metrics(server.url)
    httpx.post(f"{server.url}{CHAT}", json=chat(temperature=-1), headers=AUTH)
    httpx.post(f"{server.url}{CHAT}", json=chat())
    after = metrics(server.url)
    for status in ("400", "401"):
        labels = {"endpoint": CHAT, "status": status}
        assert sample(after, "tandem_requests_total", **labels) - sample(before, "tandem_requests_total", **labels) == 1


def test_unexpected_exceptions_become_500_engine_errors():
    """The one mapping: an exception that is not a TandemError is a 500 in OpenAI's shape, naming its type."""
    err = to_tandem_error(RuntimeError("llama exploded"))
    assert err.http_status == 500
    body = json.loads(error_response(err).body)
    assert body["error"]["type"] == "server_error" and "RuntimeError: llama exploded" in body["error"]["message"]
    same = IncompatibleDraftError("x", "y")
    assert to_tandem_error(same) is same and same.http_status == 422


def test_draft_paths_can_be_refused(tiny):
    opts = ModelOptions(model=str(tiny["main"]), draft="none", ctx_size=256, threads=1)
    app = create_app(ServerOptions(draft_paths=False), lambda: Runtime(opts, spec=RUNTIME_SPEC, announce=lambda _s: None),
                     SpecOptions())
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        r = httpx.post(f"{srv.url}{CHAT}", json=chat(draft_model=str(tiny["draft_small"])), timeout=30)
        err = assert_openai_error(r, 404, "draft_model")
        assert "none" in err["message"] and "path" not in err["message"].split("use one of:")[1]
        ok = httpx.post(f"{srv.url}{CHAT}", json=chat(draft_model="none", max_tokens=2), timeout=30)
        assert ok.status_code == 200 and ok.json()["stats"]["draft_model"] is None


def test_a_full_queue_answers_503_with_retry_after_and_the_server_keeps_serving(tiny):
    gate = threading.Event()

    def gated_runtime() -> Runtime:  # the real runtime, whose generations wait for the gate: a busy engine
        rt = Runtime(model_options(tiny), spec=RUNTIME_SPEC, announce=lambda _s: None)
        generate = rt.generate

        def gated(*args, **kwargs):
            gate.wait(60)
            yield from generate(*args, **kwargs)
        rt.generate = gated
        return rt

    srv = start(tiny_app(tiny, max_queue=1, factory=gated_runtime))
    try:
        wait_ready(srv.url)
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, "max_tokens": 4}
        results: list[httpx.Response] = []

        def post() -> None:
            with client(srv) as c:
                results.append(c.post("/v1/chat/completions", json=body))
        running, waiting = threading.Thread(target=post), threading.Thread(target=post)
        for thread, depth in ((running, (1, 0)), (waiting, (1, 1))):
            thread.start()
            deadline = time.monotonic() + 30
            while tuple(httpx.get(f"{srv.url}/health").json()["requests"].values()) != depth:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert sample(metrics(srv.url), "tandem_requests_running") == 1  # what routers and autoscalers read
        assert sample(metrics(srv.url), "tandem_queue_depth") == 1
        with client(srv) as c:
            full = c.post("/v1/chat/completions", json=body)
        err = assert_openai_error(full, 503)
        assert full.headers["Retry-After"] == "1" and err["code"] == "server_busy"
        assert "--max-queue 1" in err["message"]
        gate.set()  # the engine gets going: the running and the waiting request both complete
        running.join(60)
        waiting.join(60)
        assert [r.status_code for r in results] == [200, 200]
        with client(srv) as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200
        health = httpx.get(f"{srv.url}/health").json()
        assert health["requests"] == {"running": 0, "waiting": 0} and 0 < health["kv_cache_usage"] < 1
        assert abs(sample(metrics(srv.url), "tandem_kv_cache_usage_ratio") - health["kv_cache_usage"]) < 1e-3
    finally:
        gate.set()
        srv.stop()
