"""Runs one scheduled step on the device: builds the flattened batch (prefill chunks and decodes,
token ids and embeds rows mixed), runs the model over the paged KV cache (a captured CUDA graph
for decode batches on CUDA), and samples."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from replicas.attention import AttentionMetadata, get_attention_backend
from replicas.block_tables import DeviceBlockTables
from replicas.config import EngineConfig, ModelConfig
from replicas.cuda_graphs import DecodeGraphs, graph_batch_sizes
from replicas.loader import ModelSource
from replicas.models.llama import LlamaForCausalLM
from replicas.sampler import SampleResult, Sampler
from replicas.scheduler import SchedulerOutput
from replicas.sequence import Sequence
from replicas.step_inputs import PromptLogprobRows, StepBatch, StepInputBuilder

if TYPE_CHECKING:
    from replicas.parallel.shard import TensorShard

logger = logging.getLogger(__name__)

_PROMPT_LOGPROB_SLICE = 256
_GRAPH_MEMORY_RESERVE = 512 * 1024**2  # captured graphs' pool and allocator slack


@dataclass
class LaunchedStep:
    """A step whose device work is queued; its samples arrive in `host` once `ready` fires."""

    sched: SchedulerOutput
    sampling: list[Sequence]  # the scheduled sequences that sample, in sample-row order
    prompt_logprobs: list[tuple[Sequence, list[list[tuple[int, float, int]]]]]
    positions: list[int] = field(default_factory=list)  # where each sample goes in its sequence's token_ids
    host: torch.Tensor | None = None  # packed sample columns (pinned on CUDA)
    ready: torch.cuda.Event | None = None
    k: int | None = None

    @property
    def overlappable(self) -> bool:
        """The host may launch the next step before reading this one back (on the CPU the work is
        done at launch; the same order keeps one code path)."""
        return not self.prompt_logprobs


@dataclass
class StepResult:
    samples: list[SampleResult]  # in the order of the scheduled sequences that sample
    prompt_logprobs: list[tuple[Sequence, list[list[tuple[int, float, int]]]]]  # new entries per sequence


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, source: ModelSource, device: torch.device,
                 dtype: torch.dtype, shard: "TensorShard | None" = None):
        """shard: this rank's share of a tensor-parallel model (replicas.parallel); model_cfg then
        becomes the shape this rank runs (its heads and intermediate rows)."""
        if shard is not None:
            model_cfg = shard.local_config()
        self.cfg, self.model_cfg = cfg, model_cfg
        self.device, self.dtype = device, dtype
        self.block_size = cfg.block_size
        with torch.device(device):
            self.model = LlamaForCausalLM(model_cfg, shard).to(device=device, dtype=dtype)
        if source.state_dict is None:
            self.model.init_dummy_weights(cfg.seed)
        else:
            self.model.load_hf_state_dict(source.state_dict)
        self.model.eval()
        self.max_seqs = max(cfg.max_num_seqs, 1)
        self.max_rows = max(cfg.max_num_batched_tokens, self.max_seqs)
        self.backend = get_attention_backend(device, cfg.attention_backend, num_heads=model_cfg.num_heads,
                                             num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
                                             max_decode_batch=self.max_seqs)
        self.sampler = Sampler(model_cfg.vocab_size, model_cfg.eos_token_ids, cfg.seed, device)
        max_blocks_per_seq = -(-model_cfg.max_model_len // self.block_size)
        self.tables = DeviceBlockTables(self.max_seqs, max_blocks_per_seq, device)
        self.inputs = StepInputBuilder(self.max_rows, self.max_seqs, self.block_size, self.tables, device, dtype)
        self.num_blocks = self._num_kv_blocks()
        if shard is not None:  # every rank holds the same blocks: the smallest budget decides
            self.num_blocks = shard.group.min_int(self.num_blocks)
        shape = (2, self.num_blocks, self.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_cfg.num_layers)]
        self.graphs = self._capture_graphs()
        self._last_tokens: torch.Tensor | None = None  # the latest launched step's sampled tokens

    # ---- start-up ----------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        m = self.model_cfg
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        if self.cfg.num_gpu_blocks_override:
            return self.cfg.num_gpu_blocks_override
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = int(self.cfg.kv_cache_memory_gb * 1024**3)
        blocks = budget // self._bytes_per_block()
        if blocks < 1:
            raise ValueError("no memory left for the KV cache; lower the model size or raise the budget")
        return int(blocks)

    def _cuda_kv_budget(self) -> int:
        """Memory left for KV blocks after the largest step's activations, measured by running it."""
        peak = self._profile_peak_activation_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * self.cfg.gpu_memory_utilization) - (total - free) - peak - _GRAPH_MEMORY_RESERVE

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """A prefill of max_num_batched_tokens rows (sequences of up to max_model_len over a scratch
        cache) plus logits and sampling for max_num_seqs rows."""
        rows, m, dev = self.max_rows, self.model_cfg, self.device
        per_seq = min(rows, m.max_model_len)
        lens = [min(per_seq, rows - start) for start in range(0, rows, per_seq)]
        blocks_per_seq = -(-per_seq // self.block_size)
        scratch = [torch.zeros((2, blocks_per_seq * len(lens), self.block_size, m.num_kv_heads, m.head_dim),
                               dtype=self.dtype, device=dev) for _ in range(m.num_layers)]
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        blocks = torch.arange(blocks_per_seq * len(lens), dtype=torch.int32, device=dev).view(len(lens), -1)
        self.tables.table[:len(lens), :blocks_per_seq] = blocks
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        seq_index = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=seq_index * blocks_per_seq * self.block_size + positions,
            query_start_loc=torch.tensor(starts, device=dev), seq_lens=torch.tensor(lens, device=dev),
            block_tables=self.tables.table, seq_rows=torch.arange(len(lens), device=dev),
            max_query_len=max(lens), max_seq_len=max(lens), block_size=self.block_size)
        self.backend.prepare(meta)
        hidden = self.model(self.model.embed(positions % m.vocab_size), positions, scratch, meta, self.backend)
        logits = self.model.compute_logits(hidden[: self.max_seqs])
        torch.softmax(logits, dim=-1).sort(dim=-1)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del scratch, hidden, logits
        self.tables.table.zero_()
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.cfg.enforce_eager or self.backend.name != "triton":
            return None
        t0 = time.perf_counter()
        m = self.model_cfg
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, m.hidden_size, self.dtype, self.device,
                              graph_batch_sizes(self.max_seqs))
        for size in reversed(graphs.sizes):  # largest first: smaller graphs reuse its memory pool
            batch = self.inputs.build(SchedulerOutput(), pad_to=size)
            graphs.capture(size, batch.positions, batch.meta)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch %d..%d) in %.1f s", len(graphs.sizes), graphs.sizes[0],
                    graphs.sizes[-1], time.perf_counter() - t0)
        return graphs

    # ---- steps -------------------------------------------------------------------------------

    def release(self, seq: Sequence) -> None:
        """The sequence gave back its KV blocks (finished, aborted or preempted)."""
        self.tables.release(seq)

    @torch.inference_mode()
    def input_embeddings(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.embed_tokens(ids).detach().cpu()

    def _graph_size(self, out: SchedulerOutput) -> int | None:
        if self.graphs is None or any(s.num_new_tokens != 1 or s.seq.wants_prompt_logprobs for s in out.scheduled):
            return None
        return self.graphs.size_for(len(out.scheduled))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue the step's device work and the copy of its samples to the host; returns before the GPU
        finishes, so the host can handle the previous step meanwhile (see collect)."""
        graph_size = self._graph_size(out)
        batch = self.inputs.build(out, pad_to=graph_size, prev_tokens=self._last_tokens)
        self._send_step(batch, graph_size)
        hidden = self._forward(batch, graph_size)
        prompt_logprobs = [(p.seq, self._prompt_logprobs(hidden, p)) for p in batch.prompt_logprob_rows]
        sampling = [s.seq for s in out.scheduled if s.samples]
        step = LaunchedStep(out, sampling, prompt_logprobs)
        if sampling:
            last = hidden[batch.sample_rows]
            if self.sampler.fuses(sampling):
                launched = self.sampler.launch_fused(self.model.compute_logits(last, float32=False), sampling)
            else:
                launched = self.sampler.launch(self.model.compute_logits(last), sampling)
            self._last_tokens = launched.tokens
            step.k = launched.k
            if self.device.type == "cuda":
                step.host = torch.empty(launched.packed.shape, dtype=launched.packed.dtype, pin_memory=True)
                step.host.copy_(launched.packed, non_blocking=True)
                step.ready = torch.cuda.Event()
                step.ready.record()
            else:
                step.host = launched.packed
        return step

    def _forward(self, batch: StepBatch, graph_size: int | None) -> torch.Tensor:
        """The final-norm hidden states of the step's rows (a captured graph's replay when graph_size)."""
        if graph_size is not None:
            self.model.embed(batch.input_ids, batch.embeds_index, batch.embeds_rows,
                             out=self.graphs.hidden_in[:graph_size])
            return self.graphs.replay(graph_size)
        x = self.model.embed(batch.input_ids, batch.embeds_index, batch.embeds_rows)
        self.backend.prepare(batch.meta)
        return self.model(x, batch.positions, self.kv_caches, batch.meta, self.backend)

    def _send_step(self, batch: StepBatch, graph_size: int | None) -> None:
        """Tensor parallel: the other ranks run this step too (replicas.parallel); one device: nothing."""

    def check_health(self) -> None:
        """Raises once the runner can run no more steps (tensor parallel: a worker failed)."""

    def collect(self, step: LaunchedStep) -> StepResult:
        """The step's samples, once its copy to the host has landed."""
        if step.ready is not None:
            step.ready.synchronize()
        samples = [] if step.host is None else self.sampler.results(step.host.tolist(), step.sampling, step.k)
        return StepResult(samples, step.prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, p: PromptLogprobRows) -> list[list[tuple[int, float, int]]]:
        k = p.seq.params.prompt_logprobs
        entries = []
        for i in range(0, len(p.rows), _PROMPT_LOGPROB_SLICE):  # bounds the [rows, vocab] logits
            rows = torch.tensor(p.rows[i:i + _PROMPT_LOGPROB_SLICE], device=hidden.device)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1).cpu()
            for row, target in zip(logprobs, p.targets[i:i + _PROMPT_LOGPROB_SLICE]):
                entries.append(self.sampler.top_logprobs(row, target, k))
        return entries


__all__ = ["ModelRunner", "LaunchedStep", "StepResult", "StepBatch"]
