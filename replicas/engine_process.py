"""EngineProcess: a replica's LLMEngine in a child process of its own.

In the replica actor the engine's step loop shares one GIL with Ray Serve's threads (request
intake, the user-code event loop, streaming each chunk back, Ray's serialization); on a GPU,
where a step takes 1-4 ms of host work, the engine then waits for the GIL about as long as it
runs. Here the child process only steps the engine. The replica keeps the tokenizer and the
engine's limits, so prompts are checked, tokenized and copied on its side (errors come back at
once), and talks to the child over a socket pair:

  replica -> child: EngineOptions once, then AddCommand / AbortCommand / ShutdownCommand
  child -> replica: EngineReady once, then a StepMessage per step that changed a request (with
                    the load), or EngineFailed before the child exits.

EngineProcess has the part of LLMEngine's surface that AsyncEngine and the Replica use, so it
slots in where the engine was. Messages are pickled once each way with the standard pickler
(tensors by value: the embeds of one request, not a shared-memory handle).

A child whose parent dies sees the socket close at its next poll and exits, giving the GPU back.
"""
from __future__ import annotations

import logging
import operator
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection

import torch

from replicas.config import ModelConfig
from replicas.engine import EngineLoad, PreparedPrompt, prepare_prompt
from replicas.outputs import CompletionOutput, RequestOutput
from replicas.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_FD_ENV = "RAYLM_ENGINE_FD"
_IDLE_POLL_S = 0.5


@dataclass
class EngineOptions:
    model: str | None
    engine_kwargs: dict


@dataclass
class EngineReady:
    model_name: str
    model_config: ModelConfig
    tokenizer: object
    dtype: torch.dtype
    device: str
    enable_prompt_embeds: bool
    kv_capacity_tokens: int
    load: EngineLoad


@dataclass
class AddCommand:
    request_id: str
    prompt: PreparedPrompt  # pickled with params in one message, so prompt.params stays params
    params: SamplingParams
    options: dict = field(default_factory=dict)  # LLMEngine.add_request's keyword arguments


@dataclass
class AbortCommand:
    request_id: str


@dataclass
class ShutdownCommand:
    pass


@dataclass
class StepMessage:
    rows: list[tuple]  # the step's RequestOutputs as plain tuples (encode_outputs): pickled 2-3x faster
    load: EngineLoad


_REQUEST_FIELDS = [f.name for f in fields(RequestOutput)]
assert _REQUEST_FIELDS.index("outputs") == 3  # decode_outputs passes the fields by position
_request_head = operator.attrgetter(*(n for n in _REQUEST_FIELDS if n != "outputs"))
_completion_row = operator.attrgetter(*(f.name for f in fields(CompletionOutput)))


def encode_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    return [(_request_head(o), [_completion_row(c) for c in o.outputs]) for o in outputs]


def decode_outputs(rows: list[tuple]) -> list[RequestOutput]:
    return [RequestOutput(h[0], h[1], h[2], [CompletionOutput(*c) for c in completions], *h[3:])
            for h, completions in rows]


@dataclass
class EngineFailed:
    reason: str


def _send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


class EngineProcess:
    """The replica's side: starts the child, prepares prompts, forwards requests, and yields each
    step's outputs from `step()` (called by AsyncEngine's loop thread, the only reader)."""

    def __init__(self, model: str | None, engine_kwargs: dict, *, start_timeout_s: float = 1800.0) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env[_FD_ENV] = str(theirs.fileno())
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the replica's imports, as they resolved
        self.proc = subprocess.Popen([sys.executable, "-m", "replicas.engine_process"], env=env,
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._failed: str | None = None
        try:
            _send(self._conn, EngineOptions(model, engine_kwargs))
            ready = self._wait_ready(start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.model_name = ready.model_name
        self.model_config = ready.model_config
        self.tokenizer = ready.tokenizer
        self.dtype = ready.dtype
        self.device = torch.device(ready.device)
        self._enable_prompt_embeds = ready.enable_prompt_embeds
        self._kv_capacity_tokens = ready.kv_capacity_tokens
        self._load = ready.load

    def _wait_ready(self, timeout_s: float) -> EngineReady:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine process exited with code {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine process did not start within {timeout_s:.0f} s")
        message = _recv(self._conn)
        if isinstance(message, EngineFailed):
            raise RuntimeError(f"the engine process failed to start: {message.reason}")
        return message

    # -- what the Replica and AsyncEngine call ---------------------------------------------------
    def prepare(self, prompt, params: SamplingParams) -> PreparedPrompt:
        return prepare_prompt(prompt, params, self.tokenizer, self.model_config, self.dtype,
                              self._enable_prompt_embeds, self._kv_capacity_tokens)

    def add_request(self, request_id: str, prompt, params: SamplingParams, **options) -> None:
        if not (isinstance(prompt, PreparedPrompt) and prompt.params is params):
            prompt = self.prepare(prompt, params)
        self._command(AddCommand(request_id, prompt, params, options))

    def abort_request(self, request_id: str) -> None:
        self._command(AbortCommand(request_id))

    def has_unfinished_requests(self) -> bool:
        return True  # step() waits for the child's next message itself

    def get_load(self) -> EngineLoad:
        return self._load

    def check_health(self) -> None:
        if self._failed is not None:
            raise RuntimeError(self._failed)
        if self.proc.poll() is not None:
            raise RuntimeError(f"the engine process exited with code {self.proc.returncode}")

    def step(self) -> list[RequestOutput]:
        """The outputs of the child's next step; [] when none came within the idle poll. Raises
        when the child failed or is gone (AsyncEngine's loop then ends: the engine is dead)."""
        try:
            if not self._conn.poll(_IDLE_POLL_S):
                self.check_health()
                return []
            message = _recv(self._conn)
        except (EOFError, OSError) as e:
            self._failed = f"the engine process is gone ({e!r}, exit code {self.proc.poll()})"
            raise RuntimeError(self._failed) from None
        if isinstance(message, EngineFailed):
            self._failed = f"engine process: {message.reason}"
            raise RuntimeError(self._failed)
        self._load = message.load
        return decode_outputs(message.rows)

    def shutdown(self) -> None:
        try:
            self._command(ShutdownCommand())
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._conn.close()

    def _command(self, command) -> None:
        with self._send_lock:
            try:
                _send(self._conn, command)
            except OSError as e:
                raise RuntimeError(f"the engine process is gone ({e!r})") from None


# -- the child ----------------------------------------------------------------------------------
def _serve(conn: Connection) -> None:
    from replicas.engine import LLMEngine

    options: EngineOptions = _recv(conn)
    try:
        engine = LLMEngine.from_kwargs(model=options.model, **options.engine_kwargs)
    except BaseException as e:  # noqa: BLE001 - the replica reports why it could not start
        _send(conn, EngineFailed(f"{type(e).__name__}: {e}"))
        raise
    _send(conn, EngineReady(
        model_name=engine.model_name, model_config=engine.model_config, tokenizer=engine.tokenizer,
        dtype=engine.dtype, device=str(engine.device), enable_prompt_embeds=engine.cfg.enable_prompt_embeds,
        kv_capacity_tokens=engine.kv.num_total_blocks * engine.cfg.block_size, load=engine.get_load()))
    try:
        while True:
            busy = engine.has_unfinished_requests()
            while conn.poll(0 if busy else _IDLE_POLL_S):
                command = _recv(conn)
                if isinstance(command, ShutdownCommand):
                    return
                if isinstance(command, AddCommand):
                    engine.add_request(command.request_id, command.prompt, command.params, **command.options)
                else:
                    engine.abort_request(command.request_id)
                busy = True
            if busy:
                outputs = engine.step()
                if outputs or not engine.has_unfinished_requests():
                    _send(conn, StepMessage(encode_outputs(outputs), engine.get_load()))
    except (EOFError, OSError):
        return  # the replica is gone
    except BaseException as e:  # noqa: BLE001 - the replica's streams end with this reason
        logger.exception("engine step failed")
        try:
            _send(conn, EngineFailed(f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process: %(message)s")
    conn = Connection(int(os.environ.pop(_FD_ENV)))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    # Run as the importable module, so the messages pickle as replicas.engine_process.*
    from replicas.engine_process import main as module_main
    module_main()
