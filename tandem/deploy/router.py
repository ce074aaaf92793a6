"""Prefix-affinity routing on Ray Serve's request-router API (ray.serve.request_router.RequestRouter).

Ray ships PrefixCacheAffinityRouter in ray.serve.llm, but importing it loads ray.llm, which needs
pyarrow and the rest of ray[llm]; it also keeps its prefix tree in a separate detached actor (one more
process) and calls it with blocking ray.get from the routing loop. This router keeps a PrefixIndex in the
router itself (the ingress holds the only handle to the replicas), so it costs no process and no RPC.

Policy, per request: a request naming a replica (GET /metrics?replica=ID) goes there. A prompt that continues
a whole earlier prompt (a conversation's next turn; at least 10% of it) goes to the replica that was sent that
prompt unless it has more than `slack` ongoing requests over the least-loaded replica (or is full); otherwise,
and for new conversations, the least-loaded replica, ties going to the one that was sent the fewest prompts.
A new conversation that only shares a system prompt with earlier ones is spread like any other: sending it where
the shared prefix was last seen crowded every conversation onto one replica whenever requests came one at a
time (no load to guard), and a replica keeps only --parallel conversations warm, so they evicted each other
(turn 8 then reused the 254-token system prompt only, as random routing does); each replica caches the system
prompt after its first conversation anyway. Ray then sends the request to the first replica of the first rank
with room.
"""

from __future__ import annotations

import random

from ray.serve._private.replica_result import ReplicaResult
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tandem.deploy.prefix import PrefixIndex
from tandem.deploy.request import TandemRequest

MIN_MATCH_SHARE = 0.1
"""A prefix must cover this share of the prompt to count (a shared one-line system prompt alone does not)."""


def _request(pending: PendingRequest | None) -> TandemRequest | None:
    if pending is None:
        return None
    return next((a for a in pending.args if isinstance(a, TandemRequest)), None)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: prompt-prefix affinity with a load guard; least-loaded otherwise."""

    def initialize_state(self, slack: int = 2, affinity: bool = True, capacity: int = 200_000) -> None:
        """Called by Ray with RequestRouterConfig.request_router_kwargs."""
        self._slack = slack
        self._affinity = affinity
        self._index = PrefixIndex(capacity=capacity)
        self._prompts: dict[str, int] = {}  # prompts routed to each replica (by unique id)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Ongoing requests per replica: Ray's queue-length cache, probing the replicas it lacks."""
        cache = self.replica_queue_len_cache
        loads: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            n = cache.get(r.replica_id)
            if n is None:
                missing.append(r)
            else:
                loads[r.replica_id] = n
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                if n is not None:
                    loads[r.replica_id] = n
        return loads

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        req = _request(pending_request)
        if req is not None and req.replica:
            named = [r for r in candidate_replicas if req.replica in (r.replica_id.unique_id,
                                                                      r.replica_id.to_full_id_str())]
            if named:
                return [named]
        shuffled = list(candidate_replicas)
        random.shuffle(shuffled)
        if not (self._affinity and req is not None and req.prefix):
            return [shuffled]
        loads = await self._loads(candidate_replicas)
        holder, matched = self._index.continued(req.prefix)
        affine = None
        if holder is not None and matched >= MIN_MATCH_SHARE * len(req.prefix):
            affine = next((r for r in candidate_replicas if r.replica_id.unique_id == holder), None)
        if affine is not None:
            mine = loads.get(affine.replica_id, 0)
            least = min(loads.values(), default=0)
            if mine < affine.max_ongoing_requests and mine <= least + self._slack:
                return [[affine], [r for r in shuffled if r is not affine]]
        ranked = sorted(shuffled, key=lambda r: (loads.get(r.replica_id, 0),
                                                 self._prompts.get(r.replica_id.unique_id, 0)))
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        req = _request(pending_request)
        if self._affinity and req is not None and req.prefix:
            self._index.insert(req.prefix, replica_id.unique_id)
            self._prompts[replica_id.unique_id] = self._prompts.get(replica_id.unique_id, 0) + 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id.unique_id)
        self._prompts.pop(replica_id.unique_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._index.forget(replica_id.unique_id)
            self._prompts.pop(replica_id.unique_id, None)
