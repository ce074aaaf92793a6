"""Ray Serve settings. Each field's docstring is its `tandem serve` help (see tandem.cli.options)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import BadInputError


@dataclass
class RayOptions:
    """Scale-out with Ray Serve (pip install 'tandem[ray]')."""

    replicas: int = 0
    """Serve through Ray Serve with this many Tandem replicas, each loading its own models (0: one process,
    no Ray). With --min-replicas/--max-replicas it is the starting count and Ray autoscales."""
    min_replicas: int | None = None
    """Autoscaling: fewest replicas (setting it or --max-replicas turns Ray's autoscaler on)."""
    max_replicas: int | None = None
    """Autoscaling: most replicas."""
    target_ongoing_requests: float = 2.0
    """Autoscaling signal: Ray adds replicas while the ongoing requests per replica stay above this."""
    max_ongoing_requests: int = 8
    """Most requests Ray sends to one replica at once; the rest wait in Ray's router."""
    ray_address: str | None = None
    """Join this Ray cluster (e.g. 'auto' or 'ray://head:10001') instead of starting a local Ray instance."""
    metrics_port: int = 0
    """Port of Ray's Prometheus export on this node (a local Ray instance only; 0: a free one, printed at
    start): every replica's ray_tandem_* gauges, labelled by replica."""
    replica_cpus: float = 1.0
    """Ray CPUs reserved per replica (keep --threads at or below it)."""
    affinity: bool = True
    """Route requests sharing a prompt prefix to the replica that served it (its prefix cache is warm), unless
    that replica is busier than the least-loaded one by --affinity-slack; --no-affinity uses Ray's default
    power-of-two routing."""
    affinity_slack: int = 2
    """How many more ongoing requests the prefix-holding replica may have than the least-loaded one and still
    get the request."""
    hang_timeout: float = 300.0
    """Report a replica unhealthy (Ray restarts it) when its engine has work but made no progress for this
    many seconds."""

    def check(self) -> None:
        """BadInputError for values that cannot describe a deployment."""
        if self.replicas < 0 or self.max_ongoing_requests < 1 or self.replica_cpus < 0:
            raise BadInputError("--replicas, --max-ongoing-requests and --replica-cpus must be >= 0 (>= 1 for "
                                "--max-ongoing-requests)", "e.g. --replicas 2 --replica-cpus 1 --threads 1")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is not None and lo < 0) or (hi is not None and hi < 1) or (lo is not None and hi is not None
                                                                         and lo > hi):
            raise BadInputError(f"--min-replicas {lo} / --max-replicas {hi} is not a range",
                                "use 0 <= --min-replicas <= --max-replicas, with --max-replicas >= 1")
        if self.target_ongoing_requests <= 0 or self.affinity_slack < 0 or self.hang_timeout <= 0:
            raise BadInputError("--target-ongoing-requests and --hang-timeout must be > 0, --affinity-slack >= 0",
                                "e.g. --target-ongoing-requests 2 --affinity-slack 2")

    @property
    def enabled(self) -> bool:
        """Whether `tandem serve` goes through Ray Serve."""
        return self.replicas > 0 or self.min_replicas is not None or self.max_replicas is not None

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def initial_replicas(self) -> int:
        """Replicas to start with: --replicas, clamped into the autoscaling range."""
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas, 1)
        n = self.replicas or lo or 1
        return min(max(n, lo), hi)
