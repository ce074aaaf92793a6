"""What the Ray ingress hands a Tandem replica: one HTTP request, plus the prompt text the router keys on.

Pure Python (no Ray): the ingress builds it, the prefix-affinity router reads `prefix`, and the replica
replays it into its own Tandem app through ASGI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

REPLICA_HEADER = "x-tandem-replica"
"""Response header naming the replica that served the request (Ray Serve's replica id)."""
PID_HEADER = "x-tandem-replica-pid"
"""Response header with that replica's process id (on its node)."""
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Routes whose prompts the router keys on."""


@dataclass(frozen=True)
class TandemRequest:
    """One HTTP request forwarded from the ingress to a replica."""

    method: str
    """HTTP method."""
    path: str
    """URL path, e.g. /v1/chat/completions."""
    query: bytes = b""
    """Raw query string."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Request headers as ASGI gives them (lower-case names)."""
    body: bytes = b""
    """The whole request body."""
    prefix: str = ""
    """The prompt as text, in order (chat: each message's role and content; completions: the prompt); empty
    for requests without one. The router sends requests sharing a start of this text to one replica."""
    replica: str | None = field(default=None)
    """A replica id this request must go to (GET /metrics?replica=ID or /health?replica=ID asks one replica);
    None: any."""


def prompt_text(path: str, body: bytes) -> str:
    """The prompt of a generation request as one string, '' when there is none or the body is not JSON
    (the replica answers such bodies with its usual 400)."""
    if path not in GENERATION_PATHS or not body:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if path == "/v1/completions":
        prompt = data.get("prompt")
        if isinstance(prompt, list):  # a batch or token ids: its first entry leads the prompt
            prompt = prompt[0] if prompt else ""
        return prompt if isinstance(prompt, str) else json.dumps(prompt)
    parts = []
    for m in data.get("messages") or ():
        if isinstance(m, dict):
            parts.append(f"{m.get('role', '')}\x1f{_content(m.get('content'))}\x1e")
    return "".join(parts)


def _content(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in value)
    return "" if value is None else str(value)


def target_replica(path: str, query: bytes) -> str | None:
    """The replica a /metrics or /health request names with ?replica=ID."""
    if path not in ("/metrics", "/health") or not query:
        return None
    from urllib.parse import parse_qs
    values = parse_qs(query.decode("latin-1")).get("replica")
    return values[0] if values else None
