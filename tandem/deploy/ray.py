"""Tandem on Ray Serve: an ingress deployment (the HTTP API, chat page and stats, as `tandem serve` serves
them) in front of N Tandem replicas, each a process with its own Runtime.

The ingress reads each request's body, so the router can key on its prompt (PrefixAffinityRouter), and
forwards it to a replica through a DeploymentHandle; the replica replays it into its own Tandem app and
streams the answer back, with the headers x-tandem-replica and x-tandem-replica-pid. A request whose
replica dies before its response began is sent again (to another replica, once); one whose response had
begun ends with an OpenAI-style error (an SSE error event in a stream).

Run it with `tandem serve --replicas N ...` or the Ray way:
    serve run tandem.deploy.ray:app model=/path/main.gguf threads=1 replicas=2
(the arguments are `tandem serve` flags without their dashes; a flag without a value takes 'true').
"""


import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics as ray_metrics

from tandem.deploy.options import RayOptions
from tandem.deploy.replica import FAULTS_ENV, Watchdog, build_app, exchange, health_problem, inject_fault
from tandem.deploy.request import PID_HEADER, REPLICA_HEADER, TandemRequest, prompt_text, target_replica

REPLICA_DEPLOYMENT = "TandemReplica"
INGRESS_DEPLOYMENT = "TandemIngress"
APP_NAME = "tandem"
_REPLICA_LOST = (RayActorError, DeploymentUnavailableError)
"""What a handle raises when the replica serving a request went away."""


class TandemReplica:
    """One Tandem server (engine thread, models, prefix cache) inside a Ray Serve replica."""

    def __init__(self, ns: dict, hang_timeout: float = 300.0):
        self._app = build_app(ns)
        self._engine, self._metrics = self._app.state.engine, self._app.state.metrics
        self._engine.start()
        while self._engine.status.state == "loading":  # Ray counts the replica as up once this returns
            time.sleep(0.05)
        st = self._engine.status
        if st.state not in ("ready", "degraded"):
            self._engine.stop()
            raise RuntimeError(f"Tandem replica could not load its models: {st.reason}")
        self._id = serve.get_replica_context().replica_id.unique_id
        self._watchdog = Watchdog(hang_timeout)
        self._faults = os.environ.get(FAULTS_ENV) == "1"
        tags = ("replica",)
        self._gauges = {name: ray_metrics.Gauge(f"tandem_{name}", desc, tag_keys=tags) for name, desc in (
            ("requests_running", "Requests generating on a replica (vLLM num_requests_running)"),
            ("requests_waiting", "Requests waiting for a replica's engine (vLLM num_requests_waiting)"),
            ("kv_cache_usage_ratio", "Share of a replica's KV cache in use, 0-1 (vLLM kv_cache_usage_perc)"),
            ("prefix_cache_hits", "Prompt tokens a replica's prefix cache held, since it started"),
            ("prefix_cache_queries", "Prompt tokens looked up in a replica's prefix cache, since it started"))}

    async def __call__(self, req: TandemRequest) -> AsyncIterator[dict]:
        """The ASGI messages answering `req`, its response start carrying this replica's id and pid."""
        if self._faults:
            inject_fault(self._engine, req)
        async for message in exchange(self._app, req):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 (REPLICA_HEADER.encode(), self._id.encode()),
                                                 (PID_HEADER.encode(), str(os.getpid()).encode())])
            yield message

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes Ray replace this replica."""
        problem = health_problem(self._engine, self._watchdog)
        if problem is not None:
            raise RuntimeError(problem)

    def record_routing_stats(self) -> dict:
        """Load and cache figures for the router (RunningReplica.routing_stats) and Ray's metrics export."""
        reg = self._metrics.registry
        stats = {"requests_running": self._engine.running, "requests_waiting": self._engine.waiting,
                 "kv_cache_usage_ratio": round(self._engine.kv_usage, 4),
                 "prefix_cache_hits": reg.get_sample_value("tandem_prefix_cache_hits_total") or 0.0,
                 "prefix_cache_queries": reg.get_sample_value("tandem_prefix_cache_queries_total") or 0.0}
        for name, value in stats.items():
            self._gauges[name].set(value, tags={"replica": self._id})
        return stats

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.stop()


ingress_api = FastAPI(title="Tandem on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"Retry-After": "1"})


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_lost"}}
    return f"data: {json.dumps(body)}\n\n".encode()


@serve.ingress(ingress_api)
class TandemIngress:
    """HTTP entry point: forwards every request to a replica, resending it if that replica died before
    answering."""

    def __init__(self, replicas: DeploymentHandle, resend: int = 1):
        self._replicas = replicas
        self._resend = resend

    @ingress_api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        route, query = "/" + path, request.scope.get("query_string", b"")
        req = TandemRequest(request.method, route, query, tuple(request.scope["headers"]), body,
                            prefix=prompt_text(route, body), replica=target_replica(route, query))
        reason = ""
        for _ in range(1 + self._resend):
            gen = self._replicas.options(stream=True).remote(req)
            try:
                start = await gen.__anext__()
            except _REPLICA_LOST as e:
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                continue
            except StopAsyncIteration:
                reason = "the replica closed the response without answering"
                continue
            return self._respond(gen, start)
        return _error(503, f"no replica could answer: {reason}", "replica_unavailable")

    @staticmethod
    def _respond(gen: AsyncIterator[dict], start: dict) -> Response:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])]
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for message in gen:
                    if message["type"] == "http.response.body" and message.get("body"):
                        yield message["body"]
            except _REPLICA_LOST as e:
                if sse:  # the client already has part of the answer: say in the stream that it ends here
                    yield _sse_error(f"the replica serving this request stopped ({type(e).__name__}); "
                                     "the response is incomplete, send the request again")
            except asyncio.CancelledError:
                gen.cancel()
                raise

        response = StreamingResponse(body(), status_code=start.get("status", 200))
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return response


def deployment_app(ns: dict, opts: RayOptions) -> serve.Application:
    """The Ray Serve application: TandemIngress over TandemReplica deployments configured by `opts`."""
    settings: dict = {"name": REPLICA_DEPLOYMENT, "max_ongoing_requests": opts.max_ongoing_requests,
                      "ray_actor_options": {"num_cpus": opts.replica_cpus},
                      "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
                      "graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}
    if opts.autoscaling:
        settings["autoscaling_config"] = {
            "min_replicas": opts.min_replicas if opts.min_replicas is not None else 1,
            "max_replicas": opts.max_replicas if opts.max_replicas is not None else opts.initial_replicas(),
            "initial_replicas": opts.initial_replicas(), "target_ongoing_requests": opts.target_ongoing_requests,
            "upscale_delay_s": 2.0, "downscale_delay_s": 60.0, "metrics_interval_s": 1.0, "look_back_period_s": 4.0}
    else:
        settings["num_replicas"] = opts.replicas
    if opts.affinity:
        settings["request_router_config"] = RequestRouterConfig(
            request_router_class="tandem.deploy.router.PrefixAffinityRouter",
            request_router_kwargs={"slack": opts.affinity_slack}, request_routing_stats_period_s=2.0,
            request_routing_stats_timeout_s=5.0)
    replica = serve.deployment(TandemReplica).options(**settings).bind(ns, opts.hang_timeout)
    ingress = serve.deployment(TandemIngress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica)


def parse(argv: list[str]) -> argparse.Namespace:
    """`tandem serve` arguments, parsed as the command parses them."""
    from tandem.cli.serve import add_arguments
    p = argparse.ArgumentParser(prog="tandem serve")
    add_arguments(p)
    return p.parse_args(argv)


def to_argv(args: dict[str, str]) -> list[str]:
    """`serve run` key=value arguments as `tandem serve` flags: model=x -> --model x, affinity=false ->
    --no-affinity, a 'true' value -> the bare flag."""
    argv = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() == "true":
            argv.append(flag)
        elif str(value).lower() == "false":
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def app(args: dict[str, str]) -> serve.Application:
    """Application builder for `serve run tandem.deploy.ray:app key=value ...` and Serve config files."""
    from tandem.cli.options import build
    ns = parse(to_argv(args))
    opts = build(RayOptions, ns)
    opts.check()
    if not opts.enabled:
        opts.replicas = 1
    return deployment_app(vars(ns), opts)
