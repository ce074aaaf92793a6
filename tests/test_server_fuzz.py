"""Fuzzing from GET /openapi.json (schemathesis) against a live `tandem serve` on the tiny models: no 5xx, no
hang, OpenAI's error body on every 4xx, responses as the document declares. `tandem bench fuzz` runs the same
with more examples (docs/benchmarks.md)."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from tandem.benchmarks.fuzz import KEY, fuzz, fuzz_server, openai_error_body

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with fuzz_server(tiny["main"], tiny["draft_close"], 128, tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


def test_the_document_describes_the_request_bodies(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path, model in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert {"400", "401", "404", "413", "503"} <= set(op["responses"])
    chat = doc["components"]["schemas"]["ChatRequest"]
    assert chat["required"] == ["messages"] and {"draft_model", "draft_max", "return_token_sources"} <= set(
        chat["properties"])
    assert "422" not in doc["paths"]["/api/v0/models/{model_id}"]["get"]["responses"]  # FastAPI's, never sent


def test_fuzzing_finds_nothing(server):
    report = fuzz(server.url, examples=25)
    assert not report.failures, "\n\n".join(report.failures[:5])
    ops = {op for op, _, _ in report.statuses}
    assert len(ops) == 9 and "other methods" in ops, ops  # the 8 operations, and wrong methods (405)
    sent = {s for _, _, s in report.statuses}
    assert 200 in sent and 400 in sent, report.table()


@pytest.mark.parametrize("name", ["~nosuchuser/m.gguf", "~nosuchuser", "a/b\x00c.gguf", "../../etc/passwd"])
def test_odd_model_names_are_refused_not_500(server, name):
    """Found by fuzzing: ~user of an unknown user (and NUL bytes) made path lookups raise: a 500."""
    responses = [
        httpx.get(f"{server.url}/api/v0/models/{quote(name, safe='')}", headers=AUTH),
        httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "model": name}),
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                   json={"prompt": "hi", "max_tokens": 1, "draft_model": name}),
    ]
    for r in responses:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert openai_error_body(r) is None
