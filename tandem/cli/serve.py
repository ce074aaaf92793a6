"""`tandem serve`: the OpenAI-compatible HTTP server (see docs/api.md).

Before anything is bound or loaded, the memory plan is made from the GGUF headers (tandem.models.fit):
a missing or non-GGUF file, invalid options, or a plan that does not fit end the command at once with a
cause and a fix. Then the socket is bound (a busy port fails at once; --port 0 shows the real port), the
banner says what will be served, uvicorn starts and the engine thread loads the models in the background.
If that load fails (an incompatible draft, llama.cpp cannot load or allocate), the server stops and the
command exits non-zero with the cause and a fix on stderr: nothing is ever served without the draft that
was asked for, unless --draft-optional says so (then /health reports 'degraded' with the reason).
"""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn

from tandem.cli.options import add_options, build, explicit
from tandem.config import SERVE_PARALLEL, ModelOptions, RegistryOptions, SpecOptions
from tandem.deploy.options import RayOptions
from tandem.errors import BadInputError, TandemError
from tandem.models.fit import FitPlan, fmt
from tandem.models.library import Library
from tandem.runtime import Runtime, plan_runtime
from tandem.server.app import create_app
from tandem.server.models import ModelSource
from tandem.server.options import ServerOptions
from tandem.server.serving import UVICORN_LEVELS, bind, make_server, url_of
from tandem.server.worker import EngineStatus


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions, defaults={"parallel": SERVE_PARALLEL})
    add_options(p, SpecOptions)
    add_options(p, ServerOptions)
    add_options(p, RegistryOptions)
    add_options(p, RayOptions)
    # SUPPRESS keeps the dispatcher's global --log-level unless this one is given (same dest, no default).
    p.add_argument("--log-level", default=argparse.SUPPRESS,
                   help="Python log level: INFO shows one line per request, DEBUG per-token detail "
                        "(same as `tandem --log-level`; default: WARNING)")


def _check(opts: ServerOptions) -> None:
    if not 0 <= opts.port <= 65535:
        raise BadInputError(f"--port {opts.port} is not a TCP port", "use a number from 1 to 65535, or 0 for any")
    if opts.max_loaded_models < 1 or opts.ttl < 0:
        raise BadInputError(f"--max-loaded-models {opts.max_loaded_models} / --ttl {opts.ttl} is out of range",
                            "keep at least 1 model loaded, and use a TTL >= 0 seconds (0: never unload)")
    if opts.shutdown_timeout < 0:
        raise BadInputError(f"--shutdown-timeout {opts.shutdown_timeout} is negative",
                            "use a number of seconds >= 0 (0 ends running requests at once)")
    if opts.max_body_bytes < 1024:
        raise BadInputError(f"--max-body-bytes {opts.max_body_bytes} is too small for any request",
                            "use at least 1024 (the default is 1048576)")


def _draft_line(m: ModelOptions, spec: SpecOptions) -> str:
    knobs = f"draft-max {spec.draft_max}, draft-min {spec.draft_min}, draft-p-min {spec.draft_p_min}"
    if m.draft is not None and m.draft.lower() == "none":
        return "none: speculation off (--draft none)"
    if m.draft:
        return f"{m.draft}: speculation on ({knobs})"
    if m.model is None:
        return f"embedded default draft (SmolLM2-135M-Instruct Q4_1): speculation on ({knobs})"
    return "none: speculation off (pass --draft PATH to speculate)"


class _FailFast:
    """Start-up reporting; stops uvicorn when the background load fails, so the command exits non-zero."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None
        self.error: TandemError | None = None

    def __call__(self, status: EngineStatus) -> None:  # called from the engine thread
        if status.state in ("ready", "degraded") and status.model is not None:
            m = status.model
            spec = f"draft {m.draft_model}: speculation on" if m.draft_model else "no draft: speculation off"
            if m.draft_model and m.draft_paused:
                spec = f"draft {m.draft_model}: PAUSED, requests decode as --draft none ({m.draft_paused})"
            extra = f" (DEGRADED, --draft-optional: {status.reason})" if status.state == "degraded" else ""
            print(f"ready: {m.id} (context {m.n_ctx} tokens), {spec}{extra}", flush=True)
        elif status.state == "failed":
            self.error = status.error or TandemError(status.reason or "loading the models failed")
            print(f"NOT SERVING: {status.reason}", flush=True)
            print(f"tandem serve: error: {self.error.message}", file=sys.stderr, flush=True)
            if self.server is not None:
                self.server.should_exit = True


def _memory_line(plan: FitPlan) -> str:
    m = plan.memory
    parts = [f"main {fmt(plan.main.total)}"] + ([f"draft {fmt(plan.draft.total)}"] if plan.draft else [])
    return (f"{fmt(plan.total)} planned ({', '.join(parts)}) of {fmt(m.available)} ({m.source}); "
            "`tandem fit` shows the plan")


def main(args: argparse.Namespace) -> int:
    server = build(ServerOptions, args)
    _check(server)
    lib = Library.open(build(RegistryOptions, args), extra=(args.model, args.draft))
    source = ModelSource(lib, build(ModelOptions, args), build(SpecOptions, args), explicit(args))
    models, spec = lib.resolve(source.model_options, source.spec, source.explicit)
    plan = plan_runtime(models, spec, announce=lambda s: print(s, flush=True))  # refuses before binding
    scale = build(RayOptions, args)
    if scale.enabled:  # N replicas on Ray Serve, each planning and loading its own models
        from tandem.deploy.cli import run
        return run(args, server, scale)
    try:
        sock = bind(server.host, server.port)
    except OSError as e:
        raise BadInputError(f"cannot listen on {server.host}:{server.port}: {e.strerror or e}",
                            "pick another --port (0 picks a free one) or stop the process using it") from e
    url = url_of(sock)
    print(f"Tandem serving on {url} (OpenAI API under {url}/v1, chat page at {url}/)", flush=True)
    print(f"  main model: {models.model or 'embedded default pair (SmolLM2-135M-Instruct, F32 main)'}")
    draft = _draft_line(models, spec) if not plan.draft_status else f"none: {plan.draft_status} (--draft-optional)"
    print(f"  draft:      {draft}")
    print(f"  memory:     {_memory_line(plan)}")
    print(f"  api key:    {'required (Authorization: Bearer ...)' if server.api_key else 'not required'}")
    print("  loading the models in the background; GET /health says 'ready' when done", flush=True)
    fail = _FailFast()
    app = create_app(server, lambda: Runtime(models, spec=spec, plan=plan, announce=lambda s: print(s, flush=True)),
                     spec, on_status=fail, source=source)
    level = str(getattr(args, "log_level", "WARNING")).lower()
    fail.server = make_server(app, log_level=level if level in UVICORN_LEVELS else "warning")
    # uvicorn shuts down gracefully on SIGTERM as on Ctrl-C, then raises the signal again: make that one a
    # KeyboardInterrupt too, so a SIGTERM ends the command normally (exit 0) instead of killing it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        fail.server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    if fail.error is not None:
        return fail.error.exit_code
    print("stopped", flush=True)
    return 0
