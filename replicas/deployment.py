"""The Ray Serve replica: one engine per replica, streaming token deltas to whoever called.

Callers (the HTTP router, `cluster.connect()`) pass prompt embeds as a TOP-LEVEL argument,
normally an ObjectRef of a numpy array: Ray resolves it before the method runs, so the array
is read from the node's object store without a copy (read-only; the engine copies it once into
its own tensor).
"""
from __future__ import annotations

import collections
import contextlib
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray
from ray import serve

from replicas.async_engine import EngineDeadError
from replicas.continuation import continuation_prompt
from replicas.cpu_affinity import parse_cpu_list
from replicas.outputs import RequestOutput
from replicas.segments import unpack_segments


# The wire protocol lives in replicas.protocol; these names stay importable from here.
from replicas.protocol import (CompletionDelta, Continuation, GenerateChunk, GenerateRequest,  # noqa: E402,F401
                               LoadReport, ModelInfo, ReplicaTarget)


@dataclass
class StreamBatching:
    """How often one request's stream sends a message (Ray Serve LLM's stream_batching_interval_ms).

    A stream sends at most once per engine step and, while more than `messages_per_s` worth of
    streams are open, each waits `open streams / messages_per_s` seconds (at most `max_interval_ms`)
    after a message before the next, folding the steps made meanwhile into it: the replica's Ray
    messages per second stay near `messages_per_s` however many streams it serves. The first
    tokens and the finish are never held back. `interval_ms` sets a fixed floor.
    """

    interval_ms: float = 0.0
    messages_per_s: float = 500.0
    max_interval_ms: float = 500.0

    def interval_s(self, num_streams: int) -> float:
        adaptive = num_streams / self.messages_per_s if self.messages_per_s > 0 else 0.0
        return max(self.interval_ms / 1000, min(adaptive, self.max_interval_ms / 1000))


def chunk_of(outs: list[RequestOutput], replica_id: str, index: int | None = None) -> GenerateChunk:
    """One GenerateChunk of a request's delta outputs (oldest first), folded together.
    index: the completion index to report (a continuation's single completion resumes that one)."""
    chunk = None
    for out in outs:
        part = GenerateChunk(
            request_id=out.request_id, finished=out.finished, num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens, prompt_token_ids=out.prompt_token_ids,
            prompt_logprobs=out.prompt_logprobs, replica_id=replica_id,
            deltas=[CompletionDelta(c.index if index is None else index, c.text, c.token_ids, c.logprobs,
                                    c.finish_reason, c.stop_reason) for c in out.outputs])
        if chunk is None:
            chunk = part
        else:
            chunk.extend(part)
    return chunk


def _default_num_threads(device: str, cpu_affinity=None) -> int:
    # Ray sets OMP_NUM_THREADS from the replica's (often fractional) CPU share, which says how
    # the scheduler counts the replica, not how many cores it may use. Use the cores this process
    # may run on (or the engine's cpu_affinity names); pass engine={"num_threads": N} or
    # {"cpu_affinity": "0-7"} when several CPU replicas share a machine.
    env = os.environ.get("RAYLM_NUM_THREADS")
    if env:
        return max(1, int(env))
    if cpu_affinity is not None:
        cores = len(parse_cpu_list(cpu_affinity))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if device == "cpu" else min(4, cores)


def _embeds_type_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


class Replica:
    """One LLM engine on this actor's device (CUDA when torch sees one, else the CPU)."""

    def __init__(self, model: str | None = None, engine_kwargs: dict | None = None,
                 stream_batching: dict | None = None) -> None:
        import torch

        from replicas.async_engine import AsyncEngine
        from replicas.engine import LLMEngine
        from replicas.engine_process import EngineProcess

        kwargs = dict(engine_kwargs or {})
        # Ray's GPU accounting may be fake (tests declare GPUs a CPU machine lacks): ask torch.
        device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        affinity = kwargs.get("cpu_affinity")
        cores = parse_cpu_list(affinity) if affinity is not None else None  # a bad list fails before any engine
        threads = kwargs.pop("num_threads", None) or _default_num_threads(device, cores)
        torch.set_num_threads(threads)
        kwargs.setdefault("enable_prompt_embeds", True)
        # Debug hook for failure tests and soaks: lets `inject_fault` stop this engine's loop.
        self._fault_injection = bool(kwargs.pop("fault_injection", False))
        use_process = kwargs.pop("engine_process", None)
        if use_process is None:
            # In the replica's process the engine's step waits for the GIL behind Serve's and Ray's
            # threads (on the 2-core CPU box one stream's step took 121-158 ms there, 79-90 ms in
            # the child, 65 ms offline). Tensor-parallel rank 0 stays here: it drives Ray workers.
            use_process = int(kwargs.get("tensor_parallel_size") or 1) == 1
        if use_process:
            self.engine = EngineProcess(model, dict(kwargs, device=device, num_threads=threads))
        else:
            self.engine = LLMEngine.from_kwargs(model=model, device=device, num_threads=threads, **kwargs)
        self.async_engine = AsyncEngine(self.engine)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside Serve (unit use)
            self.replica_id = f"local-{os.getpid()}"
        self._embeds_types: collections.deque[tuple[str, str]] = collections.deque(maxlen=256)
        self.stream_batching = StreamBatching(**(stream_batching or {}))

    # -- generation ---------------------------------------------------------------------------
    async def _prompt(self, request: GenerateRequest, prompt_embeds: Any):
        if prompt_embeds is not None:
            if isinstance(prompt_embeds, ray.ObjectRef):  # passed nested by a caller: fetch it
                prompt_embeds = await prompt_embeds
            self._embeds_types.append((request.request_id, _embeds_type_name(prompt_embeds)))
        if request.prompt_segments is not None:
            return {"prompt_segments": unpack_segments(request.prompt_segments, prompt_embeds)}
        if prompt_embeds is not None:
            return {"prompt_embeds": prompt_embeds}
        if isinstance(request.prompt, str):
            return request.prompt
        return {"prompt_token_ids": list(request.prompt or [])}

    async def generate(self, request: GenerateRequest, prompt_embeds: Any = None) -> AsyncIterator[GenerateChunk]:
        """Stream GenerateChunks (call with handle.options(stream=True)).

        A bad prompt gives one chunk with `error` set; the replica is unharmed and no request
        is started. Else the first chunk is `accepted` and carries the first output (one message
        fewer per request); then the engine's deltas: at most one chunk per engine step, fewer
        while many streams are open (StreamBatching). Cancelling the call (client gone)
        aborts the request in the engine. A request with a `continuation` resumes a completion
        another replica started (see replicas.protocol.Continuation).
        """
        rid, cont = request.request_id, request.continuation
        self._require_alive()  # a dead engine refuses at once: the caller retries elsewhere
        params = request.params
        try:
            raw = await self._prompt(request, prompt_embeds)
            if cont is not None:
                raw, params, held_text = continuation_prompt(raw, params, cont, self.engine.tokenizer)
            # Checked (and tokenized, embeds copied) once here; the engine queues this as is.
            prompt = self.engine.prepare(raw, params)
        except (ValueError, TypeError) as e:
            yield GenerateChunk(request_id=rid, error=str(e), finished=True, replica_id=self.replica_id)
            return
        if cont is not None:
            first = GenerateChunk(request_id=rid, accepted=True, replica_id=self.replica_id)
            if held_text:
                first.deltas.append(CompletionDelta(cont.index, held_text, [],
                                                    [] if params.logprobs is not None else None))
        else:
            first = self._accepted(request, prompt, prompt_embeds)
        index, resumed = (None, 0) if cont is None else (cont.index, len(cont.token_ids))
        try:
            # aclosing: however this generator ends, the engine request is finished or aborted.
            outs = self.async_engine.stream(rid, prompt, params, output_offset=resumed, interval_s=self._interval)
            async with contextlib.aclosing(outs) as batches:
                async for batch in batches:
                    chunk = chunk_of(batch, self.replica_id, index)
                    chunk.num_prompt_tokens -= resumed  # the client's prompt, without the resumed tokens
                    if first is not None:  # the first tokens ride with `accepted`: one message fewer
                        first.extend(chunk)
                        chunk, first = first, None
                    yield chunk
        except ValueError as e:  # validation the engine does only when adding
            yield GenerateChunk(request_id=rid, error=str(e), finished=True, replica_id=self.replica_id)
            return
        if first is not None:  # the stream ended before any output
            yield first

    def _interval(self) -> float:
        return self.stream_batching.interval_s(self.async_engine.num_streams)

    def _accepted(self, request: GenerateRequest, prompt, prompt_embeds: Any) -> GenerateChunk:
        prompt_text = None
        if request.echo and prompt_embeds is None:
            prompt_text = request.prompt if isinstance(request.prompt, str) else self.engine.tokenizer.decode(
                list(request.prompt or []), skip_special_tokens=request.params.skip_special_tokens)
        prompt_tokens = None
        ids = prompt.prompt.prompt_token_ids
        if request.echo and request.params.prompt_logprobs is not None and ids:
            prompt_tokens = [self.engine.tokenizer.decode([t]) for t in ids]
        return GenerateChunk(request_id=request.request_id, accepted=True, prompt_text=prompt_text,
                             prompt_tokens=prompt_tokens, replica_id=self.replica_id)

    async def complete(self, request: GenerateRequest, prompt_embeds: Any = None) -> RequestOutput:
        """The finished RequestOutput of one request (for ray.get users); raises ValueError, or
        EngineDeadError when this replica's engine has failed."""
        self._require_alive()
        prompt = await self._prompt(request, prompt_embeds)
        final = None
        outs = self.async_engine.generate(request.request_id, prompt, request.params, final_only=True)
        async with contextlib.aclosing(outs) as finals:
            async for out in finals:
                final = out
        return final

    def abort(self, request_id: str, target: ReplicaTarget | None = None) -> bool:
        """Abort a request; True when it was running on this replica (see AsyncEngine.abort)."""
        if not self._is_target(target):
            return False
        return self.async_engine.abort(request_id)

    def inject_fault(self, target: ReplicaTarget | None = None) -> str | None:
        """Debug hook (engine option `fault_injection`): make this replica's engine loop fail as a
        failing step would. Returns the replica id, or None when this replica is not the target."""
        if not self._fault_injection:
            raise PermissionError("fault injection is off; start the replicas with engine option fault_injection")
        if not self._is_target(target):
            return None
        self.async_engine.inject_fault(f"fault injected into replica {self.replica_id}")
        return self.replica_id

    def _is_target(self, target: ReplicaTarget | None) -> bool:
        return target is None or target.replica_id == self.replica_id

    def _require_alive(self) -> None:
        if not self.async_engine.is_alive():
            raise EngineDeadError(f"replica {self.replica_id}: {self.async_engine.dead_reason}")
        try:
            self.engine.check_health()  # a TP worker or the engine process may fail while the engine idles
        except RuntimeError as e:
            raise EngineDeadError(f"replica {self.replica_id}: {e}") from None

    # -- state --------------------------------------------------------------------------------
    def get_load(self, target: ReplicaTarget | None = None) -> LoadReport:
        """This replica's load (`target` pins the call to one replica: see ReplicaTarget)."""
        load = self.async_engine.get_load()
        return LoadReport(
            replica_id=self.replica_id, alive=self.async_engine.is_alive(), num_waiting=load.num_waiting,
            num_running=load.num_running, num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks, num_streams=self.async_engine.num_streams,
            num_requests=self.async_engine.num_requests, num_aborted=self.async_engine.num_aborted,
            num_steps=load.num_steps, step_seconds=load.step_seconds)

    def record_routing_stats(self) -> dict:
        # Serve polls this and hands the dict to router.routing.PrefixAffinityRouter (and /metrics),
        # which read it back as a LoadReport.
        return self.get_load().to_routing_stats()

    def check_health(self) -> None:
        # Serve replaces a replica whose health check keeps failing; routers skip it at once
        # (the `alive` of its load report, and the EngineDeadError of its requests).
        self._require_alive()

    def model_info(self) -> ModelInfo:
        mc = self.engine.model_config
        dtype = getattr(self.engine, "dtype", None) or getattr(mc, "dtype", None)
        return ModelInfo(
            name=self.engine.model_name, hidden_size=mc.hidden_size, max_model_len=mc.max_model_len,
            vocab_size=mc.vocab_size, device=str(self.engine.device), dtype=str(dtype),
            replica_id=self.replica_id, node_id=ray.get_runtime_context().get_node_id(),
        )

    def tokenizer(self):
        """The model's tokenizer (routers render chat templates with it)."""
        return self.engine.tokenizer

    def embeds_types_seen(self) -> list[tuple[str, str]]:
        """(request_id, python type of the prompt_embeds argument) of recent embeds requests."""
        return list(self._embeds_types)

    def __del__(self) -> None:
        engine = getattr(self, "async_engine", None)
        if engine is not None:
            engine.shutdown()
        stop_child = getattr(getattr(self, "engine", None), "shutdown", None)  # EngineProcess
        if stop_child is not None:
            stop_child()
