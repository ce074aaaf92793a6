"""The soak's traffic (tandem bench soak): a seeded plan of mixed requests, and one HTTP client's way of sending
a request and classifying what came back.

Every planned request is a Shot: chat or completion, streamed or not, greedy or seeded, with or without the
draft (omitted, named, or "none"), and possibly a fault: malformed input that must get a typed 4xx with
OpenAI's error body, or a stream the client closes after a random number of chunks. Deterministic requests
(greedy, or seeded) are keyed by everything that decides their text, so their outputs can be compared with
the same request sent alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import httpx

PROMPTS = ("Hello, who are you?", "Write a poem about the sea.", "1 2 3 4 5 6", "Explain speculative decoding.",
           "List three colours.", "Once upon a time")
"""Prompt texts the plan draws from (short: the soak is about the server, not the model)."""
SEEDS = (1, 2)
"""Seeds of the seeded (temperature 0.8) requests."""
DRAFTS = ("default", "named", "none")
"""How a request picks its draft: omits draft_model, names the server's draft, or sends "none"."""

BAD_INPUTS: dict[str, tuple[int, str | None, str]] = {
    "bad-json": (400, None, "a body that is not JSON"),
    "missing-field": (400, "messages|prompt", "chat without messages / completion without prompt"),
    "bad-temperature": (400, "temperature", "temperature -1"),
    "bad-max-tokens": (400, "max_tokens", "max_tokens as a word"),
    "bad-token-id": (400, "prompt", "a token id outside the vocabulary (found by the engine)"),
    "too-long": (400, "prompt", "a prompt longer than the context (found by the engine)"),
    "unknown-model": (404, "model", "a model the server does not serve"),
    "unknown-draft": (404, "draft_model", "a draft_model that does not exist"),
    "no-key": (401, None, "no API key"),
}
"""Malformed request kinds: the status and error `param` each must get ("messages|prompt": the field the
endpoint takes), and what it is."""
DISCONNECT = "disconnect"
"""The fault of a stream the client closes after `cut` chunks."""
ABANDON = "abandon"
"""The fault of a whole (not streamed) long request the client stops waiting for after ABANDON_AFTER seconds."""
ABANDON_AFTER = 0.2
"""Seconds an abandoning client waits for its answer before closing the connection."""


@dataclass(frozen=True)
class Shot:
    """One planned request."""

    index: int
    """Position in the plan."""
    endpoint: str
    """chat or completion."""
    stream: bool
    """Server-sent events, or one JSON body."""
    prompt: int
    """Index into PROMPTS."""
    max_tokens: int
    """Tokens to generate at most."""
    draft: str
    """One of DRAFTS."""
    seed: int | None
    """None: greedy (temperature 0); else temperature 0.8 with this seed."""
    fault: str | None = None
    """None, a key of BAD_INPUTS, DISCONNECT or ABANDON."""
    cut: int = 0
    """DISCONNECT: content chunks read before closing the connection."""

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    @property
    def well_formed(self) -> bool:
        return self.fault in (None, DISCONNECT, ABANDON)

    @property
    def compared(self) -> bool:
        """Whether its text is compared with the same request alone (abandoned ones rarely have a text)."""
        return self.fault in (None, DISCONNECT)

    @property
    def fault_status(self) -> int:
        """The HTTP status the request must get."""
        return BAD_INPUTS[self.fault][0] if self.fault in BAD_INPUTS else 200

    @property
    def fault_param(self) -> str | None:
        """The `param` of the error a malformed request must get."""
        param = BAD_INPUTS[self.fault][1] if self.fault in BAD_INPUTS else None
        if param == "messages|prompt":
            return "messages" if self.endpoint == "chat" else "prompt"
        return param

    @property
    def key(self) -> tuple:
        """What decides the text of a well-formed request (not how it is delivered)."""
        return (self.endpoint, self.prompt, self.max_tokens, self.draft, self.seed)

    @property
    def kind(self) -> str:
        """The row of the soak's table this request counts in."""
        if self.fault in BAD_INPUTS:
            return f"bad: {self.fault}"
        if self.fault == DISCONNECT:
            return f"{self.endpoint} stream, disconnect"
        if self.fault == ABANDON:
            return f"{self.endpoint}, abandoned"
        return f"{self.endpoint}{' stream' if self.stream else ''}"

    def as_replay(self) -> Shot:
        """The same request, whole and not streamed."""
        return Shot(self.index, self.endpoint, False, self.prompt, self.max_tokens, self.draft, self.seed)


def make_plan(n: int, seed: int, *, max_tokens: int, bad_share: float, disconnect_share: float,
              long_tokens: int = 256) -> list[Shot]:
    """n Shots drawn from `seed` (the same seed, the same plan); abandoned requests ask for `long_tokens`."""
    rng = random.Random(seed)
    sizes = sorted({max(1, max_tokens // 3), max_tokens})
    shots = []
    for i in range(n):
        endpoint = rng.choice(("chat", "completion"))
        stream = rng.random() < 0.5
        size = rng.choice(sizes)
        draft = rng.choice(DRAFTS)
        sampled = rng.random() < 0.4
        seed_ = rng.choice(SEEDS) if sampled else None
        fault, cut = None, 0
        if rng.random() < bad_share:
            fault = rng.choice(sorted(BAD_INPUTS))
        elif stream and size > 2 and rng.random() < disconnect_share * 2:  # half the requests stream
            fault, cut = DISCONNECT, rng.randint(1, size // 2)
        elif not stream and rng.random() < disconnect_share:
            fault, size = ABANDON, long_tokens
        shots.append(Shot(i, endpoint, stream, rng.randrange(len(PROMPTS)), size, draft, seed_, fault, cut))
    return shots


def request(shot: Shot, draft_id: str | None, n_ctx: int) -> tuple[dict | bytes, dict[str, str]]:
    """The body (JSON, or raw bytes) and extra headers of a shot's request."""
    body: dict = {"max_tokens": shot.max_tokens}
    text = PROMPTS[shot.prompt]
    if shot.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    body["temperature"] = 0 if shot.seed is None else 0.8
    if shot.seed is not None:
        body["seed"] = shot.seed
    if shot.draft == "named" and draft_id:
        body["draft_model"] = draft_id
    elif shot.draft == "none":
        body["draft_model"] = "none"
    if shot.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers: dict[str, str] = {}
    match shot.fault:
        case "bad-json":
            return json.dumps(body).encode()[:-3] + b" oops", headers
        case "missing-field":
            body.pop("messages" if shot.endpoint == "chat" else "prompt")
        case "bad-temperature":
            body["temperature"] = -1
        case "bad-max-tokens":
            body["max_tokens"] = "many"
        case "bad-token-id":
            body.pop("messages", None)
            body["prompt"] = [1, 2, 10_000_000]
        case "too-long":
            body.pop("messages", None)
            body["prompt"] = [5] * (n_ctx + 8)
        case "unknown-model":
            body["model"] = "no-such-model"
        case "unknown-draft":
            body["draft_model"] = "no-such-draft"
        case "no-key":
            headers["Authorization"] = ""
    return body, headers


@dataclass
class Outcome:
    """What one request got."""

    shot: Shot
    """The request."""
    result: str
    """completed, error (a typed error body), disconnected (the client closed the stream), abandoned (the client
    stopped waiting for a whole answer; completed when it came first), or a problem:
    lost (no HTTP answer), incomplete (a stream that ended without [DONE]), malformed (an answer that is not
    OpenAI's shape)."""
    status: int | None = None
    """HTTP status (None: lost)."""
    path: str = ""
    """The endpoint it was sent to (bad-token-id and too-long completions go to /v1/completions)."""
    text: str = ""
    """The generated text (streams: the deltas joined)."""
    finish_reason: str | None = None
    """OpenAI's finish_reason of a completed request."""
    prompt_tokens: int = 0
    """usage.prompt_tokens of a completed request."""
    completion_tokens: int = 0
    """usage.completion_tokens of a completed request."""
    chunks: int = 0
    """Content chunks read (streams)."""
    response_id: str | None = None
    """The response's id."""
    error: dict = field(default_factory=dict)
    """The error object of a typed error."""
    detail: str = ""
    """What was wrong, for problems."""


def _error(shot: Shot, path: str, status: int, raw: bytes) -> Outcome:
    try:
        body = json.loads(raw)
    except ValueError:
        return Outcome(shot, "malformed", status, path, detail=f"HTTP {status}, body not JSON: {raw[:120]!r}")
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or len(body) != 1:
        return Outcome(shot, "malformed", status, path, detail=f"HTTP {status}, not an OpenAI error: {raw[:200]!r}")
    return Outcome(shot, "error", status, path, error=err)


def _content(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("delta") or choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def send(client: httpx.Client, shot: Shot, draft_id: str | None, n_ctx: int) -> Outcome:
    """Send one shot and classify the answer (network failures are `lost`, never raised)."""
    body, headers = request(shot, draft_id, n_ctx)
    path = "/v1/completions" if shot.fault in ("bad-token-id", "too-long") else shot.path
    kw = {"content": body, "headers": {"Content-Type": "application/json", **headers}} if isinstance(body, bytes) \
        else {"json": body, "headers": headers}
    try:
        if shot.fault == ABANDON:
            try:
                r = client.post(path, timeout=httpx.Timeout(300, read=ABANDON_AFTER), **kw)
            except httpx.ReadTimeout:
                return Outcome(shot, "abandoned", None, path)
            return _whole(shot, path, r)
        if not shot.stream:
            r = client.post(path, **kw)
            return _whole(shot, path, r)
        with client.stream("POST", path, **kw) as r:
            if r.status_code != 200:
                return _error(shot, path, r.status_code, r.read())
            return _events(shot, path, r)
    except httpx.HTTPError as e:
        return Outcome(shot, "lost", None, path, detail=f"{type(e).__name__}: {e}")
    except ValueError as e:  # a body or event that is not JSON
        return Outcome(shot, "malformed", None, path, detail=f"{type(e).__name__}: {e}")


def _whole(shot: Shot, path: str, r: httpx.Response) -> Outcome:
    if r.status_code != 200:
        return _error(shot, path, r.status_code, r.content)
    body = r.json()
    try:
        choice, usage = body["choices"][0], body["usage"]
        return Outcome(shot, "completed", 200, path, _content(choice, "message" in choice), choice["finish_reason"],
                       usage["prompt_tokens"], usage["completion_tokens"], response_id=body["id"])
    except (KeyError, IndexError, TypeError) as e:
        return Outcome(shot, "malformed", 200, path, detail=f"{type(e).__name__} {e} in {str(body)[:200]}")


def _events(shot: Shot, path: str, r: httpx.Response) -> Outcome:
    """Read a stream to [DONE], or close it after shot.cut content chunks (DISCONNECT)."""
    out = Outcome(shot, "incomplete", 200, path, detail="the stream ended without data: [DONE]")
    parts: list[str] = []
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            if out.result == "incomplete" and out.finish_reason is not None:
                out.result, out.detail = "completed", ""
            elif out.result == "incomplete":
                out.detail = "[DONE] without a finish_reason and usage"
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return Outcome(shot, "error", 200, path, "".join(parts), error=chunk["error"], chunks=out.chunks)
        out.response_id = out.response_id or chunk.get("id")
        for choice in chunk.get("choices", []):
            parts.append(_content(choice, "delta" in choice))
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
        if chunk.get("choices"):
            out.chunks += 1
        if chunk.get("usage"):
            out.prompt_tokens = chunk["usage"]["prompt_tokens"]
            out.completion_tokens = chunk["usage"]["completion_tokens"]
        if shot.fault == DISCONNECT and out.chunks >= shot.cut and out.finish_reason is None:
            out.result, out.detail = "disconnected", ""
            break  # leaving the `with` closes the connection mid-body
    out.text = "".join(parts)
    return out
