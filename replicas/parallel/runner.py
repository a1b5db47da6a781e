"""Rank 0 of a tensor-parallel group, in the engine's own process.

The engine, its scheduler and the sampler stay here, unchanged: this runner is a ModelRunner
over rank 0's shard that, before each step's forward, sends the step (replicas.parallel.messages)
to the worker actors of ranks 1..k-1, which run the same forward on their shards; the collectives
inside the model keep the ranks in step. Sampling needs per-sequence state (seeded generators,
token history for penalties, tokens sampled on the device and not read back yet), which is why
rank 0 lives with the engine rather than in an actor of its own: nothing comes back from the
workers, and a step costs rank 0 one socket write per worker (replicas.parallel.step_channel) on
top of one device's work.

A worker that fails or dies ends the group: a monitor thread, waiting on each worker's `watch`
call, records why and aborts rank 0's side of the group, so a collective that waits for the
lost rank fails instead of hanging; the step raises TensorParallelError, and so does every later
step and check_health (a Serve replica is then replaced).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref

import ray
import torch

from replicas.config import EngineConfig, ModelConfig
from replicas.loader import ModelSource
from replicas.model_runner import LaunchedStep, ModelRunner, StepResult
from replicas.parallel import placement as pl
from replicas.parallel.group import CommGroup, backend_for, host_store
from replicas.parallel.messages import EmbedMessage, StepMessage
from replicas.parallel.step_channel import StepSender
from replicas.parallel.shard import TensorShard
from replicas.parallel.worker import TensorParallelWorker
from replicas.scheduler import SchedulerOutput
from replicas.step_inputs import StepBatch

logger = logging.getLogger(__name__)
_ABORT_WAIT_S = 5.0

RENDEZVOUS_TIMEOUT_S = 600.0  # also every collective's limit: a wedged rank fails after this


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or died; this engine runs no more steps."""


class _Health:
    """The group's state, shared with the monitor thread (which must not keep the runner alive)."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.closing = False
        self.failed = threading.Event()

    def fail(self, reason: str) -> None:
        if self.failure is None and not self.closing:
            self.failure = reason
            self.failed.set()


class TensorParallelRunner(ModelRunner):
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, source: ModelSource, device: torch.device,
                 dtype: torch.dtype):
        size = cfg.tensor_parallel_size
        shard = TensorShard(model_cfg, 0, size)  # refuses a size the heads cannot take, before any actor starts
        self.placement = pl.acquire(size, device.type == "cuda", cfg.placement_group_strategy)
        self.workers: list = []
        self.health = _Health()
        try:
            device = pl.rank_device(device, self.placement)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            host = ray.util.get_node_ip_address()
            store, rdv = host_store(host, backend_for(device), size, RENDEZVOUS_TIMEOUT_S)
            self.channel = StepSender(host, rdv.prefix.encode())
            self.workers = [TensorParallelWorker.options(**pl.worker_options(self.placement, rank),
                                                         name=f"{rdv.prefix}-rank{rank}").remote(rank)
                            for rank in range(1, size)]
            worker_cfg = dataclasses.replace(cfg, device=device.type)
            started = [w.start.remote(worker_cfg, model_cfg, source.folder, rdv, self.channel.address)
                       for w in self.workers]
            self.group = shard.group = CommGroup(rdv, 0, host, device, store=store)
            try:
                super().__init__(cfg, model_cfg, source, device, dtype, shard)
            except Exception as e:
                raise TensorParallelError(f"tensor-parallel start-up failed: {self._worker_errors(started) or e}") from e
            ray.get(started)
            self.channel.accept(size - 1, RENDEZVOUS_TIMEOUT_S)
        except BaseException:
            _shutdown(self.health, self.workers, self.placement, getattr(self, "group", None),
                      getattr(self, "channel", None))
            raise
        self._lock = threading.Lock()  # one rank-0 sequence of collectives at a time (steps, embeddings)
        self._monitor = threading.Thread(target=_watch, args=(self.health, self.workers, self.group),
                                         name="raylm-tp-monitor", daemon=True)
        self._monitor.start()
        self._finalizer = weakref.finalize(self, _shutdown, self.health, self.workers, self.placement, self.group,
                                           self.channel)
        logger.info("tensor parallel: %d ranks (%s), rank 0 on %s", size, backend_for(device), device)

    @staticmethod
    def _worker_errors(started: list) -> str:
        errors = []
        for ref in started:
            try:
                ray.get(ref, timeout=5)
            except Exception as e:  # noqa: BLE001 - collected for the message
                errors.append(str(e).strip().splitlines()[-1])
        return "; ".join(errors)

    # ---- steps -------------------------------------------------------------------------------

    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        with self._lock:
            self.check_health()
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)  # the calling thread's, for streams and kernels
                return super().launch(out)
            except Exception as e:
                raise self._failed(e) from e

    def _send_step(self, batch: StepBatch, graph_size: int | None) -> None:
        self.channel.send(StepMessage.of(self.inputs, batch, graph_size))

    def collect(self, step: LaunchedStep) -> StepResult:
        result = super().collect(step)
        self.check_health()  # an aborted group leaves the step's samples unfinished
        return result

    def input_embeddings(self, token_ids: list[int]) -> torch.Tensor:
        """Every rank looks up the ids in its vocabulary rows; the embedding's all-reduce joins them."""
        with self._lock:
            self.check_health()
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                self.channel.send(EmbedMessage(len(token_ids)))
                with torch.inference_mode():
                    ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
                    return self.model.embed(ids).cpu()
            except Exception as e:
                raise self._failed(e) from e

    def check_health(self) -> None:
        if self.group.peer is not None and self.group.peer.gave_up:
            self.health.fail("tensor-parallel all-reduce: a rank stopped answering (its results are invalid)")
        if self.health.failure is not None:
            raise TensorParallelError(self.health.failure)

    def _failed(self, error: Exception) -> TensorParallelError:
        """The error of a step that raised: the failed rank's reason when the monitor learns it soon."""
        if isinstance(error, TensorParallelError):
            return error
        self.health.failed.wait(timeout=10)
        self.health.fail(f"tensor-parallel step failed on rank 0: {type(error).__name__}: {error}")
        return TensorParallelError(self.health.failure)

    def shutdown(self) -> None:
        """Stop the workers and give the placement group back (also done when the runner is collected)."""
        self._finalizer()


def _watch(health: _Health, workers: list, group: CommGroup) -> None:
    """The monitor thread: returns once any worker reports a failure or dies."""
    pending = {w.watch.remote(): rank for rank, w in enumerate(workers, start=1)}
    try:
        ready, _ = ray.wait(list(pending), num_returns=1)
    except Exception:  # noqa: BLE001 - Ray is shutting down
        return
    rank = pending[ready[0]]
    try:
        reason = f"tensor-parallel worker {ray.get(ready[0])}"
    except Exception as e:  # noqa: BLE001 - the actor died: Ray says how
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        reason = f"tensor-parallel worker rank {rank} died: {lines[0] if lines else type(e).__name__}"
    if health.closing:
        return
    logger.error(reason)
    health.fail(reason)
    group.abort()


def _shutdown(health: _Health, workers: list, placement: pl.Placement, group: CommGroup | None,
              channel: StepSender | None) -> None:
    health.closing = True
    if channel is not None:
        channel.close()  # the workers' step threads end
    if ray.is_initialized():  # else Ray ended first: it took the workers with it
        for w in workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        placement.release()
    if group is not None:
        # NCCL's abort was seen to block for minutes once the 8B model had run with graphs (H200 x2):
        # give it a few seconds on a daemon thread, then go on without it.
        aborting = threading.Thread(target=group.abort, name="raylm-tp-abort", daemon=True)
        aborting.start()
        aborting.join(_ABORT_WAIT_S)
        if aborting.is_alive():
            logger.warning("tensor-parallel group abort still blocked after %.0f s; leaving it", _ABORT_WAIT_S)
