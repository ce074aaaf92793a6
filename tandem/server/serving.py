"""Running an app under uvicorn: on a socket bound up front (so the real URL is known before serving),
in the foreground for `tandem serve`, or in a background thread for tests and embedding."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

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


def make_server(app: FastAPI, *, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server that leaves logging to the root logger and times out slow shutdowns."""
    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


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
