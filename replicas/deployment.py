"""The Ray Serve replica: one engine per replica, streaming token deltas to whoever called.

Callers (the HTTP router, `cluster.connect()`) pass prompt embeds as a TOP-LEVEL argument,
normally an ObjectRef of a numpy array: Ray resolves it before the method runs, so the array
is read from the node's object store without a copy (read-only; the engine copies it once into
its own tensor).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray
from ray import serve

from replicas.async_engine import EngineDeadError
from replicas.outputs import Logprob, RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.segments import unpack_segments


# -- what crosses the handle boundary -----------------------------------------------------------
@dataclass
class GenerateRequest:
    request_id: str
    prompt: str | list[int] | None  # None (or "") when the prompt is the embeds argument
    params: SamplingParams
    prefix_keys: list[str] = field(default_factory=list)  # read by router.routing for affinity
    echo: bool = False  # the accepted chunk then carries the prompt's text
    # A segmented prompt: token-id lists and row counts of the embeds argument (replicas.segments).
    prompt_segments: list | None = None


@dataclass
class ReplicaTarget:
    """Pins a handle call to one replica: router.routing sends it there while that replica lives,
    and a replica that is not the target ignores the call (see Replica.abort, inject_fault)."""

    replica_id: str  # Serve's unique replica id, as GenerateChunk.replica_id and the load report


@dataclass
class CompletionDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerateChunk:
    """One streamed step of a request: the new text/tokens of each of its n completions.

    The first chunk of every request is either `accepted` (the prompt passed validation, no
    tokens yet) or carries `error` (a client error: the request was never started).
    """

    request_id: str
    deltas: list[CompletionDelta] = field(default_factory=list)
    finished: bool = False
    accepted: bool = False
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    prompt_tokens: list[str] | None = None  # each prompt token's text, for echo with logprobs
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once, with the first output
    replica_id: str = ""


@dataclass
class ModelInfo:
    name: str
    hidden_size: int
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    replica_id: str
    node_id: str


class DeltaTracker:
    """Turns a request's cumulative RequestOutputs into GenerateChunks of new content."""

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id
        self._sent: dict[int, tuple[int, int]] = {}  # completion index -> (text chars, tokens)
        self._done: set[int] = set()  # completions whose finish_reason was sent
        self._first = True

    def chunk(self, out: RequestOutput) -> GenerateChunk:
        deltas = []
        for c in out.outputs:
            if c.index in self._done:  # finished earlier; later outputs repeat it unchanged
                continue
            n_text, n_ids = self._sent.get(c.index, (0, 0))
            new_ids = c.token_ids[n_ids:]
            new_text = c.text[n_text:]
            if not new_ids and not new_text and c.finish_reason is None:
                continue
            self._sent[c.index] = (len(c.text), len(c.token_ids))
            if c.finish_reason is not None:
                self._done.add(c.index)
            deltas.append(CompletionDelta(
                index=c.index, text=new_text, token_ids=list(new_ids),
                logprobs=list(c.logprobs[n_ids:]) if c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            ))
        chunk = GenerateChunk(
            request_id=out.request_id, deltas=deltas, finished=out.finished,
            num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
            prompt_token_ids=out.prompt_token_ids if self._first else None,
            prompt_logprobs=out.prompt_logprobs if self._first else None,
            replica_id=self.replica_id,
        )
        self._first = False
        return chunk


def _default_num_threads(device: str) -> int:
    # Ray sets OMP_NUM_THREADS from the replica's (often fractional) CPU share, which says how
    # the scheduler counts the replica, not how many cores it may use. Use the cores this process
    # may run on; pass engine={"num_threads": N} when several CPU replicas share a machine.
    env = os.environ.get("RAYLM_NUM_THREADS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if device == "cpu" else min(4, cores)


def _embeds_type_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


class Replica:
    """One LLM engine on this actor's device (CUDA when torch sees one, else the CPU)."""

    def __init__(self, model: str | None = None, engine_kwargs: dict | None = None) -> None:
        import torch

        from replicas.async_engine import AsyncEngine
        from replicas.engine import LLMEngine

        kwargs = dict(engine_kwargs or {})
        # Ray's GPU accounting may be fake (tests declare GPUs a CPU machine lacks): ask torch.
        device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = kwargs.pop("num_threads", None) or _default_num_threads(device)
        torch.set_num_threads(threads)
        kwargs.setdefault("enable_prompt_embeds", True)
        # Debug hook for failure tests and soaks: lets `inject_fault` stop this engine's loop.
        self._fault_injection = bool(kwargs.pop("fault_injection", False))
        self.engine = LLMEngine.from_kwargs(model=model, device=device, num_threads=threads, **kwargs)
        self.async_engine = AsyncEngine(self.engine)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside Serve (unit use)
            self.replica_id = f"local-{os.getpid()}"
        self._embeds_types: collections.deque[tuple[str, str]] = collections.deque(maxlen=256)

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
        is started. Cancelling the call (client gone) aborts the request in the engine.
        """
        rid = request.request_id
        self._require_alive()  # a dead engine refuses at once: the caller retries elsewhere
        try:
            # Checked (and tokenized, embeds copied) once here; the engine queues this as is.
            prompt = self.engine.prepare(await self._prompt(request, prompt_embeds), request.params)
        except (ValueError, TypeError) as e:
            yield GenerateChunk(request_id=rid, error=str(e), finished=True, replica_id=self.replica_id)
            return
        prompt_text = None
        if request.echo and prompt_embeds is None:
            prompt_text = request.prompt if isinstance(request.prompt, str) else self.engine.tokenizer.decode(
                list(request.prompt or []), skip_special_tokens=request.params.skip_special_tokens)
        prompt_tokens = None
        ids = prompt.prompt.prompt_token_ids
        if request.echo and request.params.prompt_logprobs is not None and ids:
            prompt_tokens = [self.engine.tokenizer.decode([t]) for t in ids]
        yield GenerateChunk(request_id=rid, accepted=True, prompt_text=prompt_text, prompt_tokens=prompt_tokens,
                            replica_id=self.replica_id)
        tracker = DeltaTracker(self.replica_id)
        try:
            # aclosing: however this generator ends, the engine request is finished or aborted.
            async with contextlib.aclosing(self.async_engine.generate(rid, prompt, request.params)) as outs:
                async for out in outs:
                    yield tracker.chunk(out)
        except ValueError as e:  # validation the engine does only when adding
            yield GenerateChunk(request_id=rid, error=str(e), finished=True, replica_id=self.replica_id)

    async def complete(self, request: GenerateRequest, prompt_embeds: Any = None) -> RequestOutput:
        """The finished RequestOutput of one request (for ray.get users); raises ValueError, or
        EngineDeadError when this replica's engine has failed."""
        self._require_alive()
        prompt = await self._prompt(request, prompt_embeds)
        final = None
        async with contextlib.aclosing(self.async_engine.generate(request.request_id, prompt, request.params)) as outs:
            async for out in outs:
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
            self.engine.runner.check_health()  # tensor parallel: a worker may fail while the engine idles
        except RuntimeError as e:
            raise EngineDeadError(f"replica {self.replica_id}: {e}") from None

    # -- state --------------------------------------------------------------------------------
    def get_load(self) -> dict:
        load = dataclasses.asdict(self.async_engine.get_load())
        total = load.get("num_total_blocks") or 0
        free = load.get("num_free_blocks") or 0
        load["kv_cache_usage"] = (total - free) / total if total else 0.0
        load["num_streams"] = self.async_engine.num_streams
        load["num_requests"] = self.async_engine.num_requests
        load["num_aborted"] = self.async_engine.num_aborted
        load["replica_id"] = self.replica_id
        load["alive"] = self.async_engine.is_alive()
        return load

    def record_routing_stats(self) -> dict:
        # Serve polls this and hands it to router.routing.PrefixAffinityRouter (and /metrics).
        return self.get_load()

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
