"""Server settings. Each field's docstring is its `tandem serve` help (see tandem.cli.options)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerOptions:
    """HTTP server."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 listens on every interface)."""
    port: int = 8080
    """TCP port to listen on; 0 picks a free one."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1 endpoints, or 'x-api-key: KEY' on Anthropic's /v1/messages (default:
    no key); several keys, comma-separated, give each client its own (the suffix cache keeps their texts apart, see
    --suffix-cache)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted, in bytes; larger bodies get HTTP 413."""
    max_queue: int = 64
    """Most requests waiting for the engine (the one generating is not counted); past that a request gets HTTP
    503 with Retry-After at once instead of waiting without bound."""
    draft_paths: bool = True
    """Let a request's draft_model name a draft GGUF by file path, loaded on demand (--no-draft-paths refuses)."""
    max_loaded_models: int = 1
    """Most main models kept loaded; loading one more (a request naming another model) unloads the least
    recently used once the new one is ready, so the loaded ones keep serving while it loads."""
    ttl: float = 0.0
    """Unload a model (or an on-demand draft) idle for this many seconds; 0 keeps them loaded."""
    shutdown_timeout: float = 30.0
    """On SIGTERM or Ctrl-C, stop accepting requests and give the running ones this many seconds to finish; the
    ones still running then end with HTTP 503 (or an error event in a stream), and the server exits."""
    cors: tuple[str, ...] = field(default=(), metadata={"metavar": "ORIGIN"})
    """Let web pages from these origins call the API from a browser (CORS), e.g. --cors http://localhost:3000;
    '*' allows every origin (default: none, only pages this server serves)."""
