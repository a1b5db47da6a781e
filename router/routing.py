"""Replica choice: least outstanding work, with prefix affinity.

`PrefixAffinityRouter` is a Ray Serve request router (the `RequestRouter` extension point of
Ray 2.60). Serve runs it inside every process that holds a handle to the `Replica` deployment
(the HTTP router, `cluster.connect()` clients), asks it to rank replicas for each request, and
then sends the request to the least-loaded replica of the first rank that is below its
`max_ongoing_requests`. When every replica is full the request waits in the handle's queue,
and once that queue holds `max_queued_requests` Serve raises `BackPressureError` (our 429).

Policy:
- load of a replica = requests in flight on it (Serve's queue-length cache, fed by every send
  and by probes) or, when unknown, running + waiting from its `record_routing_stats`.
- a request carries `prefix_keys` (hashes of growing prompt prefixes, see `prefix_keys()`).
  The replica that last served the longest known prefix is preferred while its load is within
  `imbalance_threshold` of the least loaded replica; otherwise the least loaded wins.
- ties are broken at random so idle replicas share the work.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import uuid
from collections import OrderedDict
from typing import Any, Hashable, Sequence

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve import context as serve_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.errors import overloaded, unavailable

logger = logging.getLogger(__name__)

# Prefix lengths (characters of text, token ids, or embeds rows) hashed for affinity.
_PREFIX_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
_MAX_AFFINITY_ENTRIES = 50_000

# (app name, deployment name) -> the live request router in this process (read by /metrics).
ROUTERS: dict[tuple[str, str], "PrefixAffinityRouter"] = {}


def prefix_keys(prompt: Any, embeds: np.ndarray | None = None) -> list[str]:
    """Hashes of growing prefixes of a prompt (text, token ids or an embeds array), shortest first.

    Each key also covers every shorter prefix, so the longest key two prompts share tells how
    much of their prompt is common (to the granularity of `_PREFIX_LENGTHS`). One incremental
    hash: the cost is reading at most the first `_PREFIX_LENGTHS[-1]` items once.
    """
    if embeds is not None:
        kind, n = b"e", embeds.shape[0]
        piece = lambda a, b: np.ascontiguousarray(embeds[a:b]).tobytes()  # noqa: E731
    elif isinstance(prompt, str):
        kind, n = b"s", len(prompt)
        piece = lambda a, b: prompt[a:b].encode("utf-8", "surrogatepass")  # noqa: E731
    elif isinstance(prompt, (list, tuple)):
        kind, n = b"t", len(prompt)
        piece = lambda a, b: np.asarray(prompt[a:b], dtype=np.int64).tobytes()  # noqa: E731
    else:
        return []
    lengths = [k for k in _PREFIX_LENGTHS if k <= n]
    if n and (not lengths or lengths[-1] != n) and n < _PREFIX_LENGTHS[-1]:
        lengths.append(n)  # the whole (short) prompt is a key too: repeats of it hit
    h, done, keys = hashlib.blake2b(kind, digest_size=12), 0, []
    for k in lengths:
        h.update(piece(done, k))
        done = k
        keys.append(h.copy().hexdigest())
    return keys


def rank(loads: dict[Hashable, float], preferred: Hashable | None,
         imbalance_threshold: float) -> list[list[Hashable]]:
    """Rank replica ids: the preferred one alone first when load is balanced, else least loaded."""
    if not loads:
        return []
    ids = list(loads)
    random.shuffle(ids)
    ids.sort(key=lambda r: loads[r])
    least = loads[ids[0]]
    if preferred in loads and loads[preferred] <= least + imbalance_threshold:
        return [[preferred], [r for r in ids if r != preferred]]
    best = [r for r in ids if loads[r] == least]
    rest = [r for r in ids if loads[r] != least]
    return [best, rest] if rest else [best]


def _request_prefix_keys(pending: PendingRequest | None) -> Sequence[str]:
    if pending is None:
        return ()
    for arg in list(pending.args) + list(pending.kwargs.values()):
        keys = getattr(arg, "prefix_keys", None)
        if keys:
            return keys
    return ()


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: float = 4, **kwargs) -> None:
        self.imbalance_threshold = float(imbalance_threshold)
        self._affinity: OrderedDict[str, ReplicaID] = OrderedDict()
        # Serve may ship this class by value (cloudpickle), with its own copy of module globals:
        # register in the real module so the Router's /metrics and /health find this instance.
        import router.routing as this_module

        this_module.ROUTERS[(self._deployment_id.app_name, self._deployment_id.name)] = self

    # -- load ---------------------------------------------------------------------------------
    def replica_load(self, replica: RunningReplica) -> float:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        if queued is not None:
            return float(queued)
        stats = replica.routing_stats or {}
        return float(stats.get("num_running", 0) + stats.get("num_waiting", 0))

    def replica_stats(self) -> dict[str, dict]:
        """Latest `record_routing_stats` of each live replica, by replica id (for /metrics)."""
        return {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in self._replicas_list}

    @property
    def num_live_replicas(self) -> int:
        return len(self._replicas)

    # -- RequestRouter hooks ------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every replica is ranked at once: if none can take the request, wait before asking
            # again (without this Serve retries in a tight loop that starves the event loop).
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: self.replica_load(r) for rid, r in by_id.items()}
        preferred = None
        for key in reversed(_request_prefix_keys(pending_request)):
            rid = self._affinity.get(key)
            if rid in by_id:
                preferred = rid
                break
        return [[by_id[rid] for rid in group] for group in rank(loads, preferred, self.imbalance_threshold)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for key in _request_prefix_keys(pending_request):
            self._affinity[key] = replica_id
            self._affinity.move_to_end(key)
        while len(self._affinity) > _MAX_AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, v in self._affinity.items() if v == replica_id]:
            del self._affinity[key]


# -- sending one prompt, with a retry when its replica dies -------------------------------------
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


def live_replicas(handle) -> int | None:
    """Replicas this process's request router can send to; None before its first request."""
    r = request_router_of(handle)
    return None if r is None else r.num_live_replicas


def request_router_of(handle) -> "PrefixAffinityRouter | None":
    return ROUTERS.get((handle.app_name, handle.deployment_name))


def _own_internal_request_id() -> None:
    """Give the next handle call of this task its own Serve internal request id.

    Serve 2.60 indexes the requests waiting for a replica by the caller's internal request id and
    ignores a second waiting request with the same id (it takes it for a retry), which then never
    gets a replica. Calls made on behalf of one HTTP request (one per prompt) inherit the same id,
    so each gets a fresh one. Only this task's context copy changes. Cancellation does not rely
    on the parent id: stream_prompt cancels its call itself.
    """
    var = getattr(serve_context, "_serve_request_context", None)
    get = getattr(serve_context, "_get_serve_request_context", None)
    if var is None or get is None:
        return
    ctx = get()
    if dataclasses.is_dataclass(ctx) and hasattr(ctx, "_internal_request_id"):
        var.set(dataclasses.replace(ctx, _internal_request_id=uuid.uuid4().hex))


def _replica_lost(e: BaseException) -> bool:
    return isinstance(e, _REPLICA_LOST) or isinstance(getattr(e, "cause", None), _REPLICA_LOST)


async def _first(chunks, handle, poll_s: float = 0.5):
    """The first chunk of a call; 503 if meanwhile no replica is left (Serve would wait forever)."""
    task = asyncio.ensure_future(chunks.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if live_replicas(handle) == 0:
                raise unavailable()
    finally:
        if not task.done():
            task.cancel()


async def stream_prompt(handle, request, embeds_ref=None, *, max_attempts: int = 4,
                        restart_after_output: bool = False, on_retry=None):
    """Yield the GenerateChunks of one prompt from a replica chosen by PrefixAffinityRouter.

    If the replica dies before the request produced tokens (or at any point, with
    `restart_after_output`, for a caller that has sent nothing to its client yet), the request is
    sent again; Serve drops a dead replica from the candidates. The new attempt starts with an
    `accepted` chunk again, which tells the consumer to start over. Raises APIError 429 when every
    replica and the handle's queue are full, 503 when no replica is alive.
    """
    for attempt in range(1, max_attempts + 1):
        if live_replicas(handle) == 0:
            raise unavailable()
        _own_internal_request_id()
        gen = handle.options(stream=True).generate.remote(request, embeds_ref)
        produced = done = False
        try:
            chunks = gen.__aiter__()
            chunk = await _first(chunks, handle)
            while True:
                produced = produced or bool(chunk.deltas)
                yield chunk
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
            done = True
            return
        except BackPressureError:
            done = True
            raise overloaded() from None
        except (RayServeException, RayError) as e:
            done = True
            if not _replica_lost(e) and not isinstance(e, DeploymentUnavailableError):
                raise
            if (produced and not restart_after_output) or attempt == max_attempts:
                raise unavailable(f"the replica serving this request was lost: {type(e).__name__}") from None
            logger.warning("replica lost (%s); retrying request %s on another", type(e).__name__,
                           request.request_id)
            if on_retry is not None:
                on_retry()
            # An unreachable (not yet declared dead) replica may be chosen again: give Serve time.
            await asyncio.sleep(0.1 * 2 ** (attempt - 1))
        finally:
            if not done:  # the consumer stopped early (client gone): stop the replica's work too
                gen.cancel()
