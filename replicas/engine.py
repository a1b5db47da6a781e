"""LLMEngine: requests in, one scheduler step at a time, cumulative RequestOutputs out."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from replicas.config import EngineConfig, ModelConfig
from replicas.cpu_affinity import parse_cpu_list, pin_process
from replicas.detokenizer import IncrementalDetokenizer
from replicas.inputs import ProcessedPrompt, process_prompt
from replicas.kv_cache_manager import KVCacheManager
from replicas.loader import load_model_source
from replicas.model_runner import LaunchedStep, ModelRunner
from replicas.outputs import CompletionOutput, Logprob, RequestOutput, delta_output
from replicas.sampler import SampleResult
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler
from replicas.sequence import PENDING_TOKEN, Request, Sequence

logger = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_steps: int = 0  # engine steps run so far
    step_seconds: float = 0.0  # their wall time, summed (a step also waits for the one before it)


@dataclass
class PreparedPrompt:
    """A prompt checked against its params and the engine's limits, ready to queue."""

    prompt: ProcessedPrompt
    params: SamplingParams
    max_tokens: int


def prepare_prompt(prompt, params: SamplingParams, tokenizer, model_config: ModelConfig, dtype: torch.dtype,
                   enable_prompt_embeds: bool, kv_capacity_tokens: int) -> PreparedPrompt:
    """LLMEngine.prepare's work, for callers that hold the engine's limits but not the engine
    (replicas.engine_process prepares prompts on the replica's side of the process boundary)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    processed = process_prompt(prompt, tokenizer, model_config, dtype, enable_prompt_embeds)
    if params.prompt_logprobs is not None and processed.has_embeds:
        raise ValueError("prompt_logprobs is not available for prompt_embeds (there are no prompt token ids)")
    n, limit = processed.num_tokens, model_config.max_model_len
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
    if n + max_tokens > limit:
        raise ValueError(f"the prompt has {n} tokens and max_tokens is {max_tokens}: together more than "
                         f"max_model_len ({limit}); shorten the prompt to at most {limit - max_tokens} tokens")
    if max_tokens < 1:
        raise ValueError(f"the prompt has {n} tokens, leaving no room to generate within max_model_len {limit}")
    if n + max_tokens > kv_capacity_tokens:
        raise ValueError(f"prompt ({n}) plus max_tokens ({max_tokens}) exceeds the KV cache capacity "
                         f"of {kv_capacity_tokens} tokens")
    return PreparedPrompt(processed, params, max_tokens)


@dataclass
class _Add:
    request: Request


@dataclass
class _Abort:
    request_id: str


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.device = cfg.resolve_device()
        self.dtype = cfg.resolve_dtype(self.device)
        if cfg.cpu_affinity is not None:
            cores = parse_cpu_list(cfg.cpu_affinity)
            pin_process(cores)
            if self.device.type == "cpu" and not cfg.num_threads:
                torch.set_num_threads(len(cores))
        if self.device.type == "cpu" and cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        source = load_model_source(cfg.model, cfg.load_format, cfg.tokenizer)
        self.model_name = cfg.served_model_name or source.name
        self.tokenizer = source.tokenizer
        self.model_config = ModelConfig.from_hf(source.hf_config, self.model_name, cfg.max_model_len)
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in self.model_config.eos_token_ids:
            self.model_config.eos_token_ids.append(eos)
        if cfg.tensor_parallel_size > 1:  # rank 0 here, the other ranks in Ray actors
            from replicas.parallel.runner import TensorParallelRunner
            self.runner = TensorParallelRunner(cfg, self.model_config, source, self.device, self.dtype)
            self.device = self.runner.device  # the GPU Ray gave rank 0
        else:
            self.runner = ModelRunner(cfg, self.model_config, source, self.device, self.dtype)
        del source
        self.kv = KVCacheManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max(cfg.max_num_batched_tokens, 1), cfg.max_num_seqs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_ids: set[str] = set()
        self._num_steps, self._step_seconds = 0, 0.0
        self._ids_lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._inflight: LaunchedStep | None = None  # launched, not read back yet
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d", self.model_name, self.device,
                    self.dtype, self.runner.num_blocks, cfg.block_size)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(model=model, **kwargs))

    # ---- requests in -------------------------------------------------------------------------

    def prepare(self, prompt, params: SamplingParams) -> PreparedPrompt:
        """Validate and tokenize/copy a prompt once; raises ValueError naming what was expected.
        The result can be handed to add_request so nothing is processed twice."""
        return prepare_prompt(prompt, params, self.tokenizer, self.model_config, self.dtype,
                              self.cfg.enable_prompt_embeds, self.kv.num_total_blocks * self.cfg.block_size)

    def check_health(self) -> None:
        """Raises when the runner can no longer step (tensor parallel: a worker failed)."""
        self.runner.check_health()

    def validate_prompt(self, prompt, params: SamplingParams) -> None:
        self.prepare(prompt, params)

    def add_request(self, request_id: str, prompt, params: SamplingParams, *, final_only: bool = False,
                    delta: bool = False, output_offset: int = 0, detokenize: bool = True) -> None:
        """Queue a request; `prompt` may be what prepare() returned for these params.
        final_only: step() reports the request once, when it finishes (offline generate), and its
        text is decoded then unless stop strings need it every step.
        delta: each output carries only what is new since the previous one (streams).
        output_offset: output tokens generated before this request (a failover continuation whose
        prompt ends with them): seeded sampling goes on from that output position.
        detokenize=False (delta streams without stop strings): outputs carry token ids and no text;
        the consumer decodes them (replicas.detokenizer.StreamText)."""
        prepared = prompt if isinstance(prompt, PreparedPrompt) and prompt.params is params \
            else self.prepare(prompt, params)
        request = self._make_request(request_id, prepared.prompt, params, prepared.max_tokens, final_only,
                                     output_offset)
        request.delta = delta and not final_only
        if not detokenize and request.delta and not params.stop_list:
            for seq in request.seqs:
                seq.eager_text = seq.emit_text = False
        with self._ids_lock:  # taken only once the request is built, so a failure leaks no id
            if request_id in self._pending_ids:
                raise ValueError(f"request id {request_id!r} is already running")
            self._pending_ids.add(request_id)
        self._inbox.put(_Add(request))

    def _make_request(self, request_id: str, p: ProcessedPrompt, params: SamplingParams,
                      max_tokens: int, final_only: bool, output_offset: int = 0) -> Request:
        seqs = []
        for i in range(params.n):
            generator = None if params.seed is None else \
                torch.Generator(device=self.device).manual_seed(params.seed + i)
            if generator is not None and not params.greedy:
                for _ in range(output_offset):  # the draws the sampler made for the earlier tokens
                    torch.empty(self.model_config.vocab_size, device=self.device).exponential_(generator=generator)
            context = p.context_token_ids
            seqs.append(Sequence(
                request_id=request_id, index=i, params=params, token_ids=p.sequence_token_ids,
                num_prompt_tokens=p.num_tokens, prompt_embeds=p.prompt_embeds, embeds_segments=p.embeds_segments,
                detokenizer=IncrementalDetokenizer(self.tokenizer, context, params.skip_special_tokens),
                generator=generator, max_tokens=max_tokens, eager_text=bool(params.stop_list) or not final_only,
                prompt_logprobs=[None] if params.prompt_logprobs is not None and i == 0 else None,
                output_offset=output_offset))
        return Request(request_id, p.prompt, p.prompt_token_ids, params, seqs, time.time(), final_only)

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or not self._inbox.empty()

    def get_load(self) -> EngineLoad:
        return EngineLoad(len(self.scheduler.waiting) + self._inbox.qsize(), len(self.scheduler.running),
                          self.kv.num_free_blocks, self.kv.num_total_blocks, self._num_steps, self._step_seconds)

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then read back the one before it: on CUDA the host
        handles step N's tokens while the GPU runs step N + 1, whose inputs for tokens not yet
        read back come straight from step N's device output."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self._num_steps += 1
            self._step_seconds += time.perf_counter() - start

    def _step(self) -> list[RequestOutput]:
        changed: dict[str, Request] = {}
        self._drain_inbox(changed)
        if self._inflight is not None and self._needs_token_history():
            self._read_back(self._inflight, changed)
            self._inflight = None
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self.runner.release(seq)
        launched = None
        if not sched.empty:
            launched = self.runner.launch(sched)
            for s in sched.scheduled:
                s.seq.num_computed_tokens += s.num_new_tokens
            for i, seq in enumerate(launched.sampling):
                seq.pending_sample_index = i
                launched.positions.append(len(seq.token_ids))
                seq.token_ids.append(PENDING_TOKEN)
        if self._inflight is not None:
            self._read_back(self._inflight, changed)
        self._inflight = launched
        if launched is not None and not launched.overlappable:
            self._read_back(launched, changed)
            self._inflight = None
        outputs = [self._output(r) for r in changed.values() if r.finished or not r.final_only]
        for r in changed.values():
            if r.finished:
                self._forget(r.request_id)
        if self.cfg.check_kv_integrity and self._inflight is None and not self.scheduler.has_work():
            self.kv.check_integrity()  # idle: every block is free or cached, no reference left
        return outputs

    def _needs_token_history(self) -> bool:
        """Penalties read every earlier token on the host, so they wait for the in-flight step."""
        return any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
                   for s in self.scheduler.running)

    def _read_back(self, step: LaunchedStep, changed: dict[str, Request]) -> None:
        result = self.runner.collect(step)
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(self._logprob_dict(top) for top in entries)
        # Place every token before caching blocks: a block may end with a token read back just now.
        placed = []
        for seq, sample, position in zip(step.sampling, result.samples, step.positions):
            if not seq.finished:
                seq.token_ids[position] = sample.token_id
                placed.append((seq, sample, position + 1))
        for s in step.sched.scheduled:
            if not s.seq.finished:
                self.kv.cache_full_blocks(s.seq)
        for seq, sample, length in placed:
            self._append_token(seq, sample, length)
            request = self._requests[seq.request_id]
            if not request.final_only or seq.finished:
                changed[seq.request_id] = request

    def _drain_inbox(self, changed: dict[str, Request]) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add):
                self._requests[item.request.request_id] = item.request
                for seq in item.request.seqs:
                    self.scheduler.add(seq)
            else:
                request = self._requests.get(item.request_id)
                if request is None or request.finished:
                    continue
                for seq in request.seqs:
                    if not seq.finished:
                        seq.finish_reason = "abort"
                        seq.drop_pending()
                        if seq.emit_text:
                            seq.detokenizer.flush()
                        self.scheduler.finish(seq)
                        self.runner.release(seq)
                changed[request.request_id] = request

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        with self._ids_lock:
            self._pending_ids.discard(request_id)

    def _append_token(self, seq: Sequence, result: SampleResult, length: int) -> None:
        """Account for a token already placed in token_ids; `length`: tokens read back so far
        (later entries are still PENDING_TOKEN)."""
        p = seq.params
        token = result.token_id
        num_output = length - seq.num_prompt_tokens
        seq.cumulative_logprob += result.logprob
        if result.top_logprobs is not None:
            seq.logprobs.append(self._logprob_dict(result.top_logprobs))

        can_stop = num_output >= p.min_tokens
        if can_stop and token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif can_stop and not p.ignore_eos and token in self.model_config.eos_token_ids:
            self._finish(seq, "stop", None)
        elif seq.eager_text:
            delta = seq.detokenizer.add(token)
            if delta and p.stop_list and can_stop:
                self._check_stop_strings(seq, len(delta))
        elif seq.emit_text:
            seq.detokenizer.push(token)
        if not seq.finished and (num_output >= seq.max_tokens or length >= self.model_config.max_model_len):
            self._finish(seq, "length", None)
        if not seq.finished and seq.eager_text:
            hold = max((len(s) for s in p.stop_list), default=1) - 1
            seq.visible_text_len = max(seq.visible_text_len, len(seq.detokenizer.text) - hold)

    def _logprob_dict(self, top: list[tuple[int, float, int]]) -> dict[int, Logprob]:
        return {t: Logprob(lp, rank, self.tokenizer.decode([t])) for t, lp, rank in top}

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> None:
        text = seq.detokenizer.text
        longest = max(len(s) for s in seq.params.stop_list)
        window = max(0, len(text) - delta_len - longest + 1)
        found = [(text.find(s, window), s) for s in seq.params.stop_list]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, stop = min(found)
            end = index + len(stop) if seq.params.include_stop_str_in_output else index
            seq.detokenizer.text = text[:end]
            self._finish(seq, "stop", stop)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.drop_pending()  # a step launched before this one was read back computed one token too many
        if seq.emit_text:
            seq.detokenizer.flush()
        seq.visible_text_len = len(seq.detokenizer.text)
        self.scheduler.finish(seq)
        self.runner.release(seq)

    def _output(self, r: Request) -> RequestOutput:
        if r.delta:
            return delta_output(r)
        outputs = [CompletionOutput(
            index=s.index,
            text=s.detokenizer.text[: len(s.detokenizer.text) if s.finished else s.visible_text_len],
            token_ids=s.read_output_ids(),
            cumulative_logprob=s.cumulative_logprob,
            logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
        ) for s in r.seqs]
        first = r.seqs[0]
        return RequestOutput(
            request_id=r.request_id, prompt=r.prompt, prompt_token_ids=r.prompt_token_ids, outputs=outputs,
            finished=r.finished, num_prompt_tokens=first.num_prompt_tokens,
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_tokens)

    def input_embeddings(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.input_embeddings(token_ids)
