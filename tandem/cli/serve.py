"""`tandem serve`: the OpenAI-compatible HTTP server (see docs/api.md).

The socket is bound first (so a busy port fails at once, and --port 0 shows the real port), the banner
says what will be served, then uvicorn starts and the engine thread loads the models in the background.
"""

from __future__ import annotations

import argparse

from tandem.cli.options import add_options, build, explicit
from tandem.config import ModelOptions, RegistryOptions, SpecOptions
from tandem.errors import BadInputError
from tandem.models.library import Library
from tandem.runtime import Runtime
from tandem.server.app import create_app
from tandem.server.models import ModelSource
from tandem.server.options import ServerOptions
from tandem.server.serving import UVICORN_LEVELS, bind, serve, url_of
from tandem.server.worker import EngineStatus


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions)
    add_options(p, SpecOptions)
    add_options(p, ServerOptions)
    add_options(p, RegistryOptions)
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


def _on_status(status: EngineStatus) -> None:
    if status.state == "ready" and status.model is not None:
        m = status.model
        spec = f"draft {m.draft_model}: speculation on" if m.draft_model else "no draft: speculation off"
        print(f"ready: {m.id} (context {m.n_ctx} tokens), {spec}", flush=True)
    elif status.state == "degraded":
        print(f"NOT SERVING: {status.reason} (GET /health reports 'degraded')", flush=True)


def main(args: argparse.Namespace) -> int:
    server = build(ServerOptions, args)
    _check(server)
    lib = Library.open(build(RegistryOptions, args), extra=(args.model, args.draft))
    source = ModelSource(lib, build(ModelOptions, args), build(SpecOptions, args), explicit(args))
    models, spec = lib.resolve(source.model_options, source.spec, source.explicit)
    try:
        sock = bind(server.host, server.port)
    except OSError as e:
        raise BadInputError(f"cannot listen on {server.host}:{server.port}: {e.strerror or e}",
                            "pick another --port (0 picks a free one) or stop the process using it") from e
    url = url_of(sock)
    print(f"Tandem serving on {url} (OpenAI API under {url}/v1)", flush=True)
    print(f"  main model: {models.model or 'embedded default pair (SmolLM2-135M-Instruct, F32 main)'}")
    print(f"  draft:      {_draft_line(models, spec)}")
    print(f"  api key:    {'required (Authorization: Bearer ...)' if server.api_key else 'not required'}")
    print("  loading the models in the background; GET /health says 'ready' when done", flush=True)
    app = create_app(server, lambda: Runtime(models, spec=spec, announce=lambda s: print(s, flush=True)), spec,
                     on_status=_on_status, source=source)
    level = str(getattr(args, "log_level", "WARNING")).lower()
    try:
        serve(app, sock, log_level=level if level in UVICORN_LEVELS else "warning")
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    print("stopped", flush=True)
    return 0
