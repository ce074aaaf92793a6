"""One Tandem replica's parts that need no Ray: building the app from `tandem serve` options, replaying a
forwarded request into it through ASGI, and the hang watchdog behind Ray's health check."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI

from tandem.deploy.request import TandemRequest
from tandem.server.worker import Engine

log = logging.getLogger("tandem.deploy")

FAULTS_ENV = "TANDEM_TEST_FAULTS"
"""Set to 1 in a replica's environment when it starts to enable inject_fault (tests only)."""
FAULT_HEADER = "x-tandem-fault"


def inject_fault(engine: Engine, req: TandemRequest) -> bool:
    """A test-only fault, so that a hang can be tested end to end (tests/test_ray_serve.py): a replica that
    started with TANDEM_TEST_FAULTS=1 (nothing in Tandem sets it) calls this for every request, and one with
    the header `x-tandem-fault: hang` (e.g. GET /health?replica=ID, which answers at once) blocks its engine
    thread for good before the next job, as a stuck llama.cpp call would; the requests queued after it make
    the Watchdog report the replica hung. Whether it stalled the engine."""
    if (FAULT_HEADER.encode(), b"hang") not in (tuple(h) for h in req.headers):
        return False
    log.warning("%s: hang: the engine thread stops for good (%s=1)", FAULT_HEADER, FAULTS_ENV)
    engine.stall(threading.Event())  # never set
    return True


def build_app(ns: dict) -> FastAPI:
    """The Tandem app `tandem serve` would serve, from its parsed options (an argparse Namespace's vars).
    Its engine is not started: the caller starts it (create_app's lifespan would, under uvicorn)."""
    from tandem.cli.options import build, explicit
    from tandem.config import ModelOptions, RegistryOptions, SpecOptions
    from tandem.models.library import Library
    from tandem.runtime import Runtime, plan_runtime
    from tandem.server.app import create_app
    from tandem.server.models import ModelSource
    from tandem.server.options import ServerOptions

    args = argparse.Namespace(**ns)
    lib = Library.open(build(RegistryOptions, args), extra=(args.model, args.draft))
    source = ModelSource(lib, build(ModelOptions, args), build(SpecOptions, args), explicit(args))
    models, spec = lib.resolve(source.model_options, source.spec, source.explicit)
    plan = plan_runtime(models, spec, announce=log.info)
    return create_app(build(ServerOptions, args),
                      lambda: Runtime(models, spec=spec, plan=plan, announce=log.info), spec, source=source)


@dataclass
class Watchdog:
    """Says an engine hangs: it has requests but made no progress for `timeout` seconds."""

    timeout: float
    """Seconds without progress, while busy, that count as hung."""
    _last: int = -1
    _since: float = field(default_factory=time.monotonic)

    def hung(self, engine: Engine, now: float | None = None) -> bool:
        """Whether the engine has had work and no progress (Engine.progress: a token or a batched step) for
        longer than the timeout."""
        now = time.monotonic() if now is None else now
        value = engine.progress
        if value != self._last or engine.running + engine.waiting == 0:
            self._last, self._since = value, now
            return False
        return now - self._since > self.timeout


def health_problem(engine: Engine, watchdog: Watchdog) -> str | None:
    """Why this replica should be restarted, or None while it is healthy (loading counts as healthy)."""
    st = engine.status
    if st.state == "failed":
        return f"engine failed: {st.reason}"
    if st.state == "stopped":
        return "engine stopped"
    if watchdog.hung(engine):
        return (f"engine hung: {engine.running} running, {engine.waiting} waiting and no progress for "
                f"{watchdog.timeout:g} s")
    return None


def _scope(req: TandemRequest) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "root_path": "", "query_string": req.query, "headers": [tuple(h) for h in req.headers],
            "client": ("ray-serve", 0), "server": ("tandem-replica", 0), "state": {}}


async def exchange(app: FastAPI, req: TandemRequest) -> AsyncIterator[dict]:
    """The ASGI messages `app` sends in answer to `req` (http.response.start, then body parts). Closing the
    iterator early tells the app the client is gone (a generation stops)."""
    out: asyncio.Queue[dict] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    task = asyncio.create_task(app(_scope(req), receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                while not out.empty():
                    yield out.get_nowait()
                task.result()  # the app's own exception, if it raised one
                return
            message = getter.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
