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
- a replica whose engine has failed is never chosen: this process marks it dead at the first
  EngineDeadError one of its requests gets, and every process skips a replica whose load report
  says `alive: False` (Serve replaces it once its health check fails).
- a call with a `ReplicaTarget` argument goes to that replica (Client.abort reaches the replica
  that runs the request: this router remembers where each request id was sent).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve import context as serve_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from replicas.async_engine import EngineDeadError
from replicas.protocol import Continuation, GenerateChunk, GenerateRequest, LoadReport, ReplicaTarget
from router.errors import overloaded, unavailable

logger = logging.getLogger(__name__)

# Prefix lengths (characters of text, token ids, or embeds rows) hashed for affinity.
_PREFIX_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
_MAX_AFFINITY_ENTRIES = 50_000
_MAX_TRACKED_REQUESTS = 10_000  # request id -> replica it was sent to, for targeted aborts

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


def _request_args(pending: PendingRequest | None) -> list:
    return [] if pending is None else list(pending.args) + list(pending.kwargs.values())


def _request_prefix_keys(pending: PendingRequest | None) -> Sequence[str]:
    for arg in _request_args(pending):
        keys = getattr(arg, "prefix_keys", None)
        if keys:
            return keys
    return ()


def _request_target(pending: PendingRequest | None) -> str | None:
    """The replica a call is pinned to (a ReplicaTarget argument), if any."""
    for arg in _request_args(pending):
        if isinstance(arg, ReplicaTarget):
            return arg.replica_id
    return None


def _generate_request_id(pending: PendingRequest | None) -> str | None:
    for arg in _request_args(pending):
        if isinstance(arg, GenerateRequest):
            return arg.request_id
    return None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: float = 4, **kwargs) -> None:
        self.imbalance_threshold = float(imbalance_threshold)
        self._affinity: OrderedDict[str, ReplicaID] = OrderedDict()
        self._sent_to: OrderedDict[str, str] = OrderedDict()  # request id -> replica unique id
        self._failed: set[str] = set()  # replicas whose engine failed (seen by this process)
        # Serve may ship this class by value (cloudpickle), with its own copy of module globals:
        # register in the real module so the Router's /metrics and /health find this instance.
        import router.routing as this_module

        this_module.ROUTERS[(self._deployment_id.app_name, self._deployment_id.name)] = self

    # -- load ---------------------------------------------------------------------------------
    def replica_load(self, replica: RunningReplica) -> float:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        if queued is not None:
            return float(queued)
        report = LoadReport.from_routing_stats(replica.routing_stats)
        return float(report.num_in_flight) if report is not None else 0.0

    def replica_stats(self) -> dict[str, LoadReport]:
        """Latest load report of each replica Serve has polled, by replica id (for /metrics)."""
        reports = {r.replica_id.unique_id: LoadReport.from_routing_stats(r.routing_stats) for r in self._replicas_list}
        return {rid: report for rid, report in reports.items() if report is not None}

    @property
    def num_live_replicas(self) -> int:
        return len(self.live_replica_ids())

    def live_replica_ids(self) -> list[str]:
        return [r.replica_id.unique_id for r in self._replicas_list if self._usable(r)]

    def _usable(self, replica: RunningReplica) -> bool:
        if replica.replica_id.unique_id in self._failed:
            return False
        report = LoadReport.from_routing_stats(replica.routing_stats)
        return report is None or report.alive

    def mark_failed(self, replica_id: str) -> None:
        """Send this replica nothing more (its engine failed; Serve will replace it)."""
        self._failed.add(replica_id)

    def replica_of(self, request_id: str) -> str | None:
        """The replica this process last sent a request id to."""
        return self._sent_to.get(request_id)

    def forget(self, request_id: str) -> None:
        self._sent_to.pop(request_id, None)

    # -- RequestRouter hooks ------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every replica is ranked at once: if none can take the request, wait before asking
            # again (without this Serve retries in a tight loop that starves the event loop).
            pending_request.routing_context.should_backoff = True
        usable = [r for r in candidate_replicas if self._usable(r)]
        target = _request_target(pending_request)
        pinned = [r for r in usable if r.replica_id.unique_id == target]
        if pinned:
            return [pinned]
        by_id = {r.replica_id: r for r in usable}
        loads = {rid: self.replica_load(r) for rid, r in by_id.items()}
        preferred = None
        for key in reversed(_request_prefix_keys(pending_request)):
            rid = self._affinity.get(key)
            if rid in by_id:
                preferred = rid
                break
        return [[by_id[rid] for rid in group] for group in rank(loads, preferred, self.imbalance_threshold)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        request_id = _generate_request_id(pending_request)
        if request_id is not None:
            self._sent_to[request_id] = replica_id.unique_id
            self._sent_to.move_to_end(request_id)
            while len(self._sent_to) > _MAX_TRACKED_REQUESTS:
                self._sent_to.popitem(last=False)
        for key in _request_prefix_keys(pending_request):
            self._affinity[key] = replica_id
            self._affinity.move_to_end(key)
        while len(self._affinity) > _MAX_AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, v in self._affinity.items() if v == replica_id]:
            del self._affinity[key]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._failed &= {r.replica_id.unique_id for r in replicas}  # replaced ones are gone


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


def _is(e: BaseException, kinds) -> bool:
    """Whether e, or the exception a replica raised that e wraps, is one of `kinds`."""
    return isinstance(e, kinds) or isinstance(getattr(e, "cause", None), kinds)


def replica_lost(e: BaseException) -> bool:
    """Whether a call's error means its replica is gone (the call may go to another one)."""
    return _is(e, _REPLICA_LOST) or engine_failed(e) or isinstance(e, DeploymentUnavailableError)


def engine_failed(e: BaseException) -> bool:
    """Whether a call's error is its replica's engine reporting itself dead."""
    return _is(e, EngineDeadError)


def note_replica_loss(handle, request_id: str, e: BaseException) -> None:
    """After a replica-lost error: a replica whose engine reported itself dead gets no more work here."""
    if engine_failed(e):
        replica_failed(handle, request_id)


def retry_delay_s(attempt: int) -> float:
    """The pause before attempt + 1: an unreachable (not yet declared dead) replica may be chosen
    again, so Serve gets time to notice."""
    return 0.05 * 2 ** (attempt - 1)


def replica_failed(handle, request_id: str) -> None:
    """The replica that ran `request_id` reported its engine dead: route nothing more to it."""
    r = request_router_of(handle)
    replica = r.replica_of(request_id) if r is not None else None
    if replica is not None:
        logger.warning("replica %s: engine failed; routing around it", replica)
        r.mark_failed(replica)


def forget_request(handle, request_id: str) -> None:
    r = request_router_of(handle)
    if r is not None:
        r.forget(request_id)


def _kind(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    return type(cause if isinstance(cause, BaseException) else e).__name__


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


@dataclass
class _Sent:
    """What the consumer of a prompt's stream has received of each completion: enough to resume
    the unfinished ones on another replica."""

    token_ids: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, list[str]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, cont: Continuation | None) -> "_Sent":
        if cont is None:
            return cls()
        return cls({cont.index: list(cont.token_ids)}, {cont.index: [cont.text]})

    def record(self, chunk: GenerateChunk) -> None:
        for d in chunk.deltas:
            self.token_ids.setdefault(d.index, []).extend(d.token_ids)
            self.text.setdefault(d.index, []).append(d.text)
            if d.finish_reason is not None:
                self.finished.add(d.index)

    @property
    def any(self) -> bool:
        return any(self.token_ids.values()) or any(t for parts in self.text.values() for t in parts)

    def continuation(self, index: int) -> Continuation:
        return Continuation(index, list(self.token_ids.get(index, [])), "".join(self.text.get(index, [])))


async def stream_prompt(handle, request: GenerateRequest, embeds_ref=None, *, max_attempts: int = 4,
                        on_retry=None):
    """Yield the GenerateChunks of one prompt from a replica chosen by PrefixAffinityRouter.

    The consumer sees one `accepted` chunk (or an `error` chunk) first, and each token once (the
    accepted chunk may carry the first ones). If the replica is lost, the prompt goes to another:
    from the start while nothing was generated, else each unfinished completion resumes after
    what was sent (replicas.protocol.Continuation), so the stream goes on with no token repeated
    or missing. Raises APIError 429 when every replica
    and the handle's queue are full, 503 when no replica is alive (or `max_attempts` were lost).
    """
    sent = _Sent.of(request.continuation)
    accepted = False
    for attempt in range(1, max_attempts + 1):
        if live_replicas(handle) == 0:
            raise unavailable()
        if sent.any and request.params.n > 1 and request.continuation is None:
            async for chunk in _resume_each(handle, request, embeds_ref, sent, max_attempts - attempt + 1, on_retry):
                yield chunk
            return
        call = request if not sent.any else dataclasses.replace(
            request, continuation=sent.continuation(request.continuation.index if request.continuation else 0),
            echo=False)
        _own_internal_request_id()
        gen = handle.options(stream=True).generate.remote(call, embeds_ref)
        done = False
        try:
            chunks = gen.__aiter__()
            chunk = await _first(chunks, handle)
            while True:
                if accepted:  # a retry's `accepted`: its output goes on, its flag does not
                    chunk = _output_only(chunk)
                if chunk is not None:
                    accepted |= chunk.accepted
                    sent.record(chunk)
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
        except (RayServeException, RayError, EngineDeadError) as e:
            done = True
            if not replica_lost(e):
                raise
            note_replica_loss(handle, request.request_id, e)
            if attempt == max_attempts:
                raise unavailable(f"the replica serving this request was lost: {_kind(e)}") from None
            logger.warning("replica lost (%s); %s request %s on another", _kind(e),
                           "resuming" if sent.any else "retrying", request.request_id)
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(retry_delay_s(attempt))
        finally:
            if not done:  # the consumer stopped early (client gone): stop the replica's work too
                gen.cancel()
            forget_request(handle, request.request_id)


def _output_only(chunk: GenerateChunk) -> GenerateChunk | None:
    """A chunk without its `accepted` flag (the output it may carry goes on); None when an
    accepted chunk carries nothing else."""
    if not chunk.accepted:
        return chunk
    chunk.accepted = False
    return chunk if chunk.deltas or chunk.finished else None


async def _resume_each(handle, request: GenerateRequest, embeds_ref, sent: _Sent, max_attempts: int, on_retry):
    """n > 1: each unfinished completion resumes as its own one-completion request; their chunks
    are merged into one stream (the request is finished when every completion is)."""
    streams = [stream_prompt(handle, dataclasses.replace(request, request_id=f"{request.request_id}.{i}",
                                                         continuation=sent.continuation(i), echo=False),
                             embeds_ref, max_attempts=max_attempts, on_retry=on_retry)
               for i in range(request.params.n) if i not in sent.finished]
    left = len(streams)
    async for chunk in _merged(streams):
        chunk = _output_only(chunk)  # the request was accepted long ago
        if chunk is None:
            continue
        left -= chunk.finished
        chunk.finished = left == 0
        yield chunk


async def _merged(streams: list):
    """Chunks of several async iterators as they come; the first exception ends them all."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream) -> None:
        try:
            async for chunk in stream:
                await queue.put(chunk)
            await queue.put(end)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
