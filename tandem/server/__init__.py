"""Tandem's OpenAI-compatible HTTP server (see docs/api.md)."""

from tandem.server.app import create_app
from tandem.server.options import ServerOptions

__all__ = ["ServerOptions", "create_app"]
