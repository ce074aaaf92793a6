"""Running an app under uvicorn: on a socket bound up front (so the real URL is known before serving),
in the foreground for `tandem serve`, or in a background thread for tests and embedding.

Shutting down (SIGTERM, Ctrl-C, or `should_exit`) is graceful: the socket closes at once (a restart can bind
the port), the engine refuses new requests (503, code shutting_down) and /health says `draining`, and the
requests already in have --shutdown-timeout seconds to finish. Those still running then end with an error
that names the cause: a 503 body, or an error event closing a stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from tandem.errors import LoadingError

log = logging.getLogger("tandem.server")

_WRITE_ERRORS_S = 5.0
"""Seconds the ended requests get to write their errors before their connections are dropped."""

UVICORN_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class _Server(uvicorn.Server):
    """uvicorn, whose shutdown drains the app's engine and ends what outlives the grace period with an error."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float):
        super().__init__(config)
        self.app, self.grace = app, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        engine = getattr(self.app.state, "engine", None)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if engine is not None:
            engine.drain()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after their response
        if not await self._wait_for_connections(self.grace) and engine is not None:
            log.warning("shutting down: ending %d request(s) still running after --shutdown-timeout %g s",
                        len(self.server_state.connections), self.grace)
            engine.abort(LoadingError(f"the server is shutting down and this request did not finish within its "
                                      f"--shutdown-timeout of {self.grace:g} s", "retry against a running server",
                                      code="shutting_down"))
            await self._wait_for_connections(_WRITE_ERRORS_S)
        for task in self.server_state.tasks:
            task.cancel(msg="the server is shutting down")
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _wait_for_connections(self, seconds: float) -> bool:
        """Wait until every connection has closed (True), or `seconds` pass or a second Ctrl-C comes (False)."""
        deadline = time.monotonic() + seconds
        while self.server_state.connections or self.server_state.tasks:
            if self.force_exit or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def make_server(app: FastAPI, *, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server that leaves logging to the root logger and shuts down gracefully (see the module doc);
    the grace period is the app's --shutdown-timeout (app.state.options), 5 s for other apps."""
    options = getattr(app.state, "options", None)
    grace = float(getattr(options, "shutdown_timeout", 5.0))
    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=int(grace), lifespan="on")
    return _Server(config, app, grace)


def serve(app: FastAPI, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM."""
    make_server(app, log_level=log_level).run(sockets=[sock])


class ServerThread:
    """An app served by uvicorn in a background thread on a free loopback port. A context manager."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = make_server(app, log_level=log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="tandem-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
