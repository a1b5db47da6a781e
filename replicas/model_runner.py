"""Builds one flattened batch per step (prefill chunks and decodes, token ids and embeds rows
mixed), runs the model over the paged KV cache, and samples."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from replicas.attention import AttentionMetadata, get_attention_backend
from replicas.config import EngineConfig, ModelConfig
from replicas.loader import ModelSource
from replicas.models.llama import LlamaForCausalLM
from replicas.sampler import SampleResult, Sampler
from replicas.scheduler import SchedulerOutput
from replicas.sequence import Sequence

logger = logging.getLogger(__name__)

_PROMPT_LOGPROB_SLICE = 256


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    embeds_mask: torch.Tensor  # [T] bool: row takes a supplied embedding
    embeds_rows: torch.Tensor | None  # [mask.sum(), hidden]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] flat row whose logits yield each sampling sequence's token
    prompt_logprob_rows: list[PromptLogprobRows]


@dataclass
class PromptLogprobRows:
    """Rows of one sequence's prefill chunk whose logits score the next prompt token."""

    seq: Sequence
    rows: list[int]  # flat rows
    targets: list[int]  # the prompt token each row predicts


@dataclass
class StepResult:
    samples: list[SampleResult]  # in the order of the scheduled sequences that sample
    prompt_logprobs: list[tuple[Sequence, list[list[tuple[int, float, int]]]]]  # new entries per sequence


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, source: ModelSource, device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.device, self.dtype = device, dtype
        self.block_size = cfg.block_size
        with torch.device(device):
            self.model = LlamaForCausalLM(model_cfg).to(device=device, dtype=dtype)
        if source.state_dict is None:
            self.model.init_dummy_weights(cfg.seed)
        else:
            self.model.load_hf_state_dict(source.state_dict)
        self.model.eval()
        self.backend = get_attention_backend(device)
        self.num_blocks = self._num_kv_blocks()
        shape = (2, self.num_blocks, self.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_cfg.num_layers)]
        self.sampler = Sampler(model_cfg.vocab_size, model_cfg.eos_token_ids, cfg.seed)

    def _bytes_per_block(self) -> int:
        m = self.model_cfg
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        if self.cfg.num_gpu_blocks_override:
            return self.cfg.num_gpu_blocks_override
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = 2 * 1024**3  # activations and sampler work space
            budget = int(total * self.cfg.gpu_memory_utilization) - (total - free) - reserve
        else:
            budget = int(self.cfg.kv_cache_memory_gb * 1024**3)
        blocks = budget // self._bytes_per_block()
        if blocks < 1:
            raise ValueError("no memory left for the KV cache; lower the model size or raise the budget")
        return int(blocks)

    @torch.inference_mode()
    def input_embeddings(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.embed_tokens(ids).detach().cpu()

    def _prepare(self, out: SchedulerOutput) -> ModelInputs:
        bs = self.block_size
        ids, positions, mask, rows, sample_rows = [], [], [], [], []
        q_starts, seq_lens, tables = [0], [], []
        prompt_rows: list[PromptLogprobRows] = []
        for s in out.scheduled:
            seq, start, end = s.seq, s.start, s.start + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            n_embeds = max(0, min(end, seq.num_embeds) - start)
            mask.extend([True] * n_embeds + [False] * (end - start - n_embeds))
            if n_embeds:
                rows.append(seq.prompt_embeds[start:start + n_embeds])
            q_starts.append(q_starts[-1] + end - start)
            seq_lens.append(end)
            tables.append(seq.block_table)
            if s.samples:
                sample_rows.append(q_starts[-1] - 1)
            if seq.wants_prompt_logprobs:
                # Position p scores prompt token p + 1; skip targets an earlier run (before a preemption) scored.
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    base = q_starts[-2] - start
                    prompt_rows.append(PromptLogprobRows(seq, [base + p for p in range(first, last)],
                                                         seq.token_ids[first + 1:last + 1]))

        dev = self.device
        pos_t = torch.tensor(positions, dtype=torch.long)
        max_blocks = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        seq_index = torch.repeat_interleave(torch.arange(len(tables)),
                                            torch.tensor([q_starts[i + 1] - q_starts[i] for i in range(len(tables))]))
        slots = table_t[seq_index, pos_t // bs].long() * bs + pos_t % bs
        q_start_t = torch.tensor(q_starts, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev),
            query_start_loc=q_start_t.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table_t.to(dev),
            max_query_len=max(s.num_new_tokens for s in out.scheduled),
            max_seq_len=max(seq_lens),
            block_size=bs,
        )
        return ModelInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=pos_t.to(dev),
            embeds_mask=torch.tensor(mask, dtype=torch.bool, device=dev),
            embeds_rows=torch.cat(rows).to(dev, self.dtype) if rows else None,
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            prompt_logprob_rows=prompt_rows,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        inputs = self._prepare(out)
        self.backend.prepare(inputs.meta)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.embeds_mask, inputs.embeds_rows,
                            self.kv_caches, inputs.meta, self.backend)
        prompt_logprobs = [(p.seq, self._prompt_logprobs(hidden, p)) for p in inputs.prompt_logprob_rows]
        samples = []
        if inputs.sample_rows.numel():
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            samples = self.sampler(logits, [s.seq for s in out.scheduled if s.samples])
        return StepResult(samples, prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, p: PromptLogprobRows) -> list[list[tuple[int, float, int]]]:
        k = p.seq.params.prompt_logprobs
        entries = []
        for i in range(0, len(p.rows), _PROMPT_LOGPROB_SLICE):  # bounds the [rows, vocab] logits
            rows = torch.tensor(p.rows[i:i + _PROMPT_LOGPROB_SLICE], device=hidden.device)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1).cpu()
            for row, target in zip(logprobs, p.targets[i:i + _PROMPT_LOGPROB_SLICE]):
                entries.append(self.sampler.top_logprobs(row, target, k))
        return entries
