"""Ranks 1..k-1 of a tensor-parallel group: a Ray actor each, running every step rank 0 sends.

A worker holds its share of the weights and the KV cache (its KV heads of every block) and runs
the same ModelRunner forward as rank 0 from the step's message; it samples nothing. Messages
come over the worker's connection to rank 0 (replicas.parallel.step_channel), read and run in
order on a thread of the worker's own; the actor's methods only start it and report failures.

A failure in a step ends the worker's part: it records why, aborts its process group (so rank 0's
pending collectives fail at once instead of waiting) and answers `watch`, which rank 0 keeps a
call of open to learn of a failure or of the actor's death.
"""
from __future__ import annotations

import logging
import threading

import ray
import torch

from replicas.config import EngineConfig, ModelConfig
from replicas.loader import ModelSource, SafetensorsWeights
from replicas.model_runner import _PROMPT_LOGPROB_SLICE, ModelRunner
from replicas.parallel.group import CommGroup, Rendezvous
from replicas.parallel.messages import EmbedMessage, StepMessage
from replicas.parallel.step_channel import ChannelAddress, StepReceiver
from replicas.parallel.placement import rank_device
from replicas.parallel.shard import TensorShard

logger = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"watch": 1})
class TensorParallelWorker:
    def __init__(self, rank: int):
        self.rank = rank
        self.runner: ModelRunner | None = None
        self.group: CommGroup | None = None
        self.device = torch.device("cpu")
        self._failed = threading.Event()
        self._reason = ""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def start(self, cfg: EngineConfig, model_cfg: ModelConfig, weights: str | None, rdv: Rendezvous,
              channel: ChannelAddress) -> None:
        """Join the group and build this rank's runner; rank 0 builds its own meanwhile (the start-up
        collectives, KV sizing and CUDA graph capture, run in step with it). Then run rank 0's
        messages as they come."""
        self._run(self._start, cfg, model_cfg, weights, rdv, channel, reraise=True)

    def _start(self, cfg: EngineConfig, model_cfg: ModelConfig, weights: str | None, rdv: Rendezvous,
               channel: ChannelAddress) -> None:
        receiver = StepReceiver(channel, self.rank, rdv.timeout_s)
        try:
            self._build(cfg, model_cfg, weights, rdv)
        except BaseException:
            receiver.close()
            raise
        threading.Thread(target=self._serve, args=(receiver, torch.get_num_threads()), name="raylm-tp-steps",
                         daemon=True).start()

    def _build(self, cfg: EngineConfig, model_cfg: ModelConfig, weights: str | None, rdv: Rendezvous) -> None:
        self.device = rank_device(cfg.resolve_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(cfg.num_threads or 1)
        self.group = CommGroup(rdv, self.rank, ray.util.get_node_ip_address(), self.device)
        shard = TensorShard(model_cfg, self.rank, rdv.world_size, self.group)
        state = SafetensorsWeights(weights) if weights else None
        source = ModelSource(model_cfg.name, model_cfg.hf_config, None, state, weights)
        self.runner = ModelRunner(cfg, model_cfg, source, self.device, cfg.resolve_dtype(self.device), shard)

    def _serve(self, receiver: StepReceiver, num_threads: int) -> None:
        """Rank 0's messages, in order, until it closes the connection (or this rank fails)."""
        torch.set_num_threads(num_threads)  # per thread (see replicas.async_engine): the count _build set
        try:
            while not self._failed.is_set():
                msg = receiver.receive()
                if msg is None:
                    return
                if isinstance(msg, StepMessage):
                    self._run(self._step, msg)
                elif isinstance(msg, EmbedMessage):
                    self._run(self._embed, msg.num_ids)
        finally:
            receiver.close()

    @torch.inference_mode()
    def _step(self, msg: StepMessage) -> None:
        r = self.runner
        filled = msg.filled_step()
        batch = r.inputs.load(msg.filled_regions(filled), filled)
        hidden = r._forward(batch, msg.graph_size)
        # The LM head's all-gathers, in rank 0's order: prompt-logprob rows, then the sampled rows.
        for rows in msg.logit_rows:
            for i in range(0, len(rows), _PROMPT_LOGPROB_SLICE):
                r.model.compute_logits(hidden[torch.as_tensor(rows[i:i + _PROMPT_LOGPROB_SLICE], device=self.device)])
        if batch.num_samples:
            r.model.compute_logits(hidden[batch.sample_rows])

    @torch.inference_mode()
    def _embed(self, num_ids: int) -> None:
        """Rank 0's input_embeddings of num_ids ids (they arrive in the embedding's broadcast)."""
        self.runner.model.embed(torch.zeros(num_ids, dtype=torch.long, device=self.device))

    @ray.method(concurrency_group="watch")
    def watch(self) -> str:
        """Returns (only) once this rank has failed: why."""
        self._failed.wait()
        return self._reason

    def _run(self, fn, *args, reraise: bool = False) -> None:
        if self._failed.is_set():
            return
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported through watch, then the group ends
            logger.exception("tensor-parallel rank %d failed", self.rank)
            self._reason = f"rank {self.rank}: {type(e).__name__}: {e}"
            self._failed.set()
            if self.group is not None:
                self.group.abort()
            if reraise:
                raise
