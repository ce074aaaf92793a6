"""`tandem serve --replicas N`: start (or join) Ray, deploy Tandem on Ray Serve, serve until Ctrl-C/SIGTERM,
then take the application down (and Ray with it, when this command started Ray)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

from tandem.deploy.options import RayOptions
from tandem.errors import BadInputError, LoadFailedError
from tandem.server.options import ServerOptions


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, server: ServerOptions, opts: RayOptions) -> int:
    """Serve through Ray Serve until interrupted; the exit status."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BadInputError(f"--replicas needs Ray Serve, which is not installed ({e})",
                            "pip install 'tandem[ray]', or drop --replicas to serve from one process") from e
    from tandem.deploy.ray import APP_NAME, deployment_app

    opts.check()
    port = server.port or _free_port(server.host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    local = opts.ray_address is None
    most = max(opts.max_replicas or 0, opts.initial_replicas())
    cpus = max(os.cpu_count() or 1, int(most * opts.replica_cpus + 0.999)) if local else None
    extra = {"_metrics_export_port": opts.metrics_port or _free_port(server.host)} if local else {}
    ctx = ray.init(address=opts.ray_address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                   configure_logging=False, **extra)
    try:
        serve.start(http_options={"host": server.host, "port": port})
        url = f"http://{server.host}:{port}"
        scale = (f"{opts.min_replicas if opts.min_replicas is not None else 1}-{opts.max_replicas or most} "
                 f"replicas (autoscaling, start {opts.initial_replicas()})" if opts.autoscaling
                 else f"{opts.replicas} replicas")
        print(f"Ray Serve: {scale}, {opts.replica_cpus:g} CPU each, routing "
              f"{'by prompt prefix' if opts.affinity else 'power-of-two'}; loading...", flush=True)
        try:
            serve.run(deployment_app(vars(args), opts), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # Ray: "Deploying application tandem failed: ..." (a replica could not load)
            raise LoadFailedError(f"the replicas did not start: {str(e).splitlines()[0]}",
                                  "see the replica's error above (or Ray's logs under /tmp/ray/session_latest/"
                                  "logs/serve); `tandem serve` without --replicas shows the same cause") from e
        metrics = ctx.address_info.get("metrics_export_port")
        if metrics:
            print(f"  Ray metrics (ray_tandem_* per replica): http://{ctx.address_info.get('node_ip_address')}:"
                  f"{metrics}/metrics", flush=True)
        session = ctx.address_info.get("session_dir")
        if local and session:
            print(f"  Ray Serve logs (the controller's health checks, each replica's log): {session}/logs/serve",
                  flush=True)
        print(f"Tandem serving on {url} through Ray Serve (OpenAI API under {url}/v1, chat page at {url}/)",
              flush=True)
        stop.wait()
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    print("stopped", flush=True)
    return 0
