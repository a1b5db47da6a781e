"""AsyncEngine: an asyncio face on LLMEngine.

One background thread runs `engine.step()` while there is work, so requests that arrive while
others run are batched together by the engine's scheduler. Each request has a stream (a list
and a waiter) on the event loop that asked for it; after every step the thread hands that step's
outputs to each waiting loop in one call (one wake-up per loop and step, however many requests it
serves), and only consumers not holding their stream are woken.
`generate` yields cumulative RequestOutputs (or only the final one); `stream` yields delta
outputs, all those that arrived since the consumer last asked, so a consumer that is slower than
the engine gets several steps at once. A consumer that stops early (client gone, task cancelled)
aborts its request, which frees its KV blocks.

When the loop ends (an exception in a step, or shutdown) the engine is dead for good: every
waiting request gets EngineDeadError, and so does every later one. Marking it dead and taking
the list of waiting requests happen under the same lock as registering a request, so none can
slip in between and wait forever.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from replicas.detokenizer import StreamText
from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop thread has stopped; this engine serves no more requests."""


class InjectedFault(RuntimeError):
    """What the loop raises after `inject_fault()` (a debug hook for failure tests)."""


# Aborts of ids not (yet) here are remembered this long, so an abort that overtakes its request
# (a caller that submits and aborts at once) still ends it.
_EARLY_ABORT_TTL_S = 60.0
_MAX_EARLY_ABORTS = 10_000


class _Stream:
    """One request's outputs waiting for its consumer, on the consumer's loop.

    The engine thread hands a step's outputs to every stream at once; a consumer that is holding
    its stream (StreamBatching's interval) is not woken for them, only for a final output, so a
    step costs the loop one wake-up per stream that will actually send, not one per stream."""

    __slots__ = ("loop", "items", "waiter", "holding")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.holding = False

    def push(self, item) -> None:
        """On the loop: add an output (or the exception that ends the stream)."""
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done() and (not self.holding or _is_final(item)):
            w.set_result(None)

    async def wait(self, timeout: float | None = None) -> None:
        """Until push wakes this consumer (or `timeout` seconds pass)."""
        fut = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _resolve, fut) if timeout is not None else None
        try:
            await fut
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()


class AsyncEngine:
    def __init__(self, engine, *, idle_poll_s: float = 0.5) -> None:
        self.engine = engine
        self._idle_poll_s = idle_poll_s
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._dead: str | None = None  # why the loop ended; set once, under _lock
        self._fault: str | None = None
        self._early_aborts: dict[str, float] = {}  # request id -> expiry (time.monotonic)
        self.num_requests = 0  # requests started
        self.num_aborted = 0  # requests whose consumer left before they finished
        self._num_threads = torch.get_num_threads()  # the count set where the engine was built
        self._thread = threading.Thread(target=self._run, name="raylm-engine-loop", daemon=True)
        self._thread.start()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        # OpenMP's thread count is per thread: torch.set_num_threads where the engine was built does
        # not reach this thread, which would start from OMP_NUM_THREADS (Ray sets it to an actor's
        # CPU share, often 1): a CPU replica's forward ran on one core of two.
        torch.set_num_threads(self._num_threads)
        reason = "engine shut down"
        try:
            while not self._stop.is_set():
                self._wakeup.clear()
                if self._fault is not None:
                    raise InjectedFault(self._fault)
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(self._idle_poll_s)
                    continue
                self._deliver(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("engine loop died")
            reason = f"engine loop died: {e!r}"
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            streams = list(self._streams.values())
        for s in streams:
            self._put(s, EngineDeadError(reason))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs (fresh objects the engine never touches again) to their loops."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        with self._lock:
            for out in outs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumers' loop is closed: nobody will read these requests
                for _, out in items:
                    if not out.finished:
                        self.engine.abort_request(out.request_id)

    def _put(self, stream: _Stream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.push, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this request
            if isinstance(item, RequestOutput) and not item.finished:
                self.engine.abort_request(item.request_id)

    # -- public -------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def get_load(self):
        return self.engine.get_load()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def abort(self, request_id: str) -> bool:
        """Abort a request; True when it was running here. An id not here yet is remembered for
        a while and aborted as soon as it arrives."""
        with self._lock:
            running = request_id in self._streams
            if not running:
                self._remember_early_abort(request_id)
        self._abort_in_engine(request_id)
        return running

    def inject_fault(self, message: str = "injected fault") -> None:
        """Debug hook: the loop raises InjectedFault at its next turn, as a failing step() would."""
        self._fault = message
        self._wakeup.set()

    def _abort_in_engine(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wakeup.set()

    def _remember_early_abort(self, request_id: str) -> None:
        now = time.monotonic()
        for rid, expiry in list(self._early_aborts.items()):  # oldest first
            if expiry > now and len(self._early_aborts) < _MAX_EARLY_ABORTS:
                break
            del self._early_aborts[rid]
        self._early_aborts[request_id] = now + _EARLY_ABORT_TTL_S

    def _register(self, request_id: str, stream: _Stream) -> bool:
        """Add a request's stream; True when an early abort of it is pending. Raises once dead."""
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
            expiry = self._early_aborts.pop(request_id, None)
        return expiry is not None and expiry > time.monotonic()

    async def generate(self, request_id: str, prompt, params: SamplingParams, *,
                       final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield the cumulative RequestOutput of one request until it is finished (with final_only
        only the finished one, its text decoded once at the end).

        Raises ValueError (bad prompt or params) before the first output, EngineDeadError when the
        loop has died. Closing the iterator early aborts the request.
        """
        async for outs in self._outputs(request_id, prompt, params, final_only=final_only):
            yield outs[-1]  # cumulative: when the consumer is behind, only the newest matters

    async def stream(self, request_id: str, prompt, params: SamplingParams, *, output_offset: int = 0,
                     interval_s: Callable[[], float] | None = None) -> AsyncIterator[list[RequestOutput]]:
        """Yield the delta RequestOutputs of one request: each time, all that arrived since the
        last (one per engine step that changed it), oldest first, until the finished one.
        interval_s: after the first output, wait this long after each yield before the next one
        (a finished output is yielded at once). Raises and aborts as `generate`; output_offset:
        see LLMEngine.add_request. Without stop strings the text is decoded here, once per yield
        (StreamText), not token by token on the engine's thread."""
        from replicas.engine import PreparedPrompt

        text = None
        if not params.stop_list:
            if not (isinstance(prompt, PreparedPrompt) and prompt.params is params):
                prompt = self.engine.prepare(prompt, params)
            text = StreamText(self.engine.tokenizer, prompt.prompt.context_token_ids, params.skip_special_tokens)
        async for outs in self._outputs(request_id, prompt, params, interval_s, delta=True,
                                        output_offset=output_offset, detokenize=text is None):
            if text is not None:
                text.fill(outs)
            yield outs

    async def _outputs(self, request_id: str, prompt, params: SamplingParams,
                       interval_s: Callable[[], float] | None = None, **add) -> AsyncIterator[list]:
        stream = _Stream(asyncio.get_running_loop())
        aborted_early = self._register(request_id, stream)
        finished = False
        try:
            self.engine.add_request(request_id, prompt, params, **add)
        except BaseException:
            finished = True  # never added: nothing to abort
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        self.num_requests += 1
        if aborted_early:
            self.engine.abort_request(request_id)  # queued after the add: it ends with "abort"
        self._wakeup.set()
        loop, hold_until = stream.loop, 0.0
        try:
            while not finished:
                if not stream.items:
                    await stream.wait()
                wait = hold_until - loop.time()
                if wait > 0 and not any(_is_final(x) for x in stream.items):
                    stream.holding = True  # fold the steps made meanwhile; a final output ends the wait
                    try:
                        await stream.wait(wait)
                    finally:
                        stream.holding = False
                items, stream.items = stream.items, []
                error = next((x for x in items if isinstance(x, BaseException)), None)
                outs = [x for x in items if not isinstance(x, BaseException)]
                finished = any(o.finished for o in outs)
                if outs:
                    yield outs
                    if interval_s is not None:
                        hold_until = loop.time() + interval_s()
                if error is not None and not finished:
                    finished = True
                    raise error
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.num_aborted += 1
                self._abort_in_engine(request_id)

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=10)


def _is_final(item) -> bool:
    return isinstance(item, BaseException) or item.finished


def _put_all(items: list) -> None:
    for stream, out in items:
        stream.push(out)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)

