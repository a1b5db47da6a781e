"""Python handles on a running raylm application, for `ray.get` users.

    from cluster import connect, SamplingParams
    client = connect()                                   # the "raylm" app on the current cluster
    ref = client.submit({"prompt_embeds": ray.put(t)}, SamplingParams(max_tokens=16))
    out = ray.get(ref)                                   # a RequestOutput
    ref = client.submit_chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe:"}, {"type": "prompt_embeds", "data": t}]}], params)

Prompts take the offline LLM's forms, plus `{"prompt_segments": [ids, embeds, ids, ...]}` and
`{"messages": [...]}` (a chat: rendered here with the model's chat template, fetched once from a
replica; tensor parts' rows are spliced in and travel stacked as one top-level array).

Requests go to the `Replica` deployment through a Serve handle, so they are routed by the same
PrefixAffinityRouter as HTTP requests: `stream` from this process, `submit` from this process's
Completer actor (cluster.completer), which sends a request again when its replica is lost, so the
returned ref does not die with the replica. Prompt embeds travel as a top-level argument of the
replica call: an ObjectRef you `ray.put` once is resolved by Ray on the replica's node (zero-copy
for numpy); an array passed directly is put in the object store once.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import ray
from ray import serve

from cluster.completer import start_completer
from replicas.chat_template import chat_prompt
from replicas.protocol import CompletionDelta, GenerateRequest, ReplicaTarget
from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.segments import pack_segments
from router.routing import prefix_keys, request_router_of, stream_prompt

DEFAULT_APP_NAME = "raylm"  # cluster.app's default application name
REPLICA_DEPLOYMENT = "Replica"


def _split_prompt(prompt: Any) -> tuple[str | list[int] | None, Any]:
    """(text or token ids, embeds) of a prompt in any of the offline LLM's forms."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_embeds" in prompt:
            return None, prompt["prompt_embeds"]
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), None
        if "prompt" in prompt:
            return prompt["prompt"], None
        raise ValueError("a prompt dict needs one of 'prompt', 'prompt_token_ids', 'prompt_embeds'")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt), None
    raise ValueError(f"unsupported prompt type {type(prompt).__name__}")


def _embeds_arg(embeds: Any) -> Any:
    """What travels to the replica: an ObjectRef as is, a torch tensor as a numpy array."""
    if embeds is None or isinstance(embeds, (ray.ObjectRef, np.ndarray)):
        return embeds
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return embeds
    if isinstance(embeds, torch.Tensor):
        t = embeds.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return embeds


@dataclass
class Client:
    app_name: str
    handle: Any  # DeploymentHandle of the Replica deployment
    _tokenizer: Any = field(default=None, repr=False)  # for chat templates, fetched once
    _info: Any = field(default=None, repr=False)
    _completer: Any = field(default=None, repr=False)  # cluster.completer.Completer, started at the first submit

    def _chat_prompt(self, chat: dict) -> dict:
        if self._tokenizer is None:
            self._tokenizer = self.handle.tokenizer.remote().result(timeout_s=60)
            self._info = self.model_info()
        return chat_prompt(self._tokenizer, chat["messages"], hidden_size=self._info.hidden_size,
                           add_generation_prompt=chat.get("add_generation_prompt", True),
                           template_kwargs=chat.get("chat_template_kwargs"))

    def _request(self, prompt: Any, params: SamplingParams | None, request_id: str | None):
        request_id = request_id or f"client-{uuid.uuid4().hex}"
        if isinstance(prompt, dict) and "messages" in prompt:
            prompt = self._chat_prompt(prompt)
        if isinstance(prompt, dict) and "prompt_segments" in prompt:
            segments = [s if isinstance(s, (list, tuple)) else _embeds_arg(s) for s in prompt["prompt_segments"]]
            wire, embeds = pack_segments(segments)
            lead = wire[0] if wire and isinstance(wire[0], list) else []
            return GenerateRequest(request_id=request_id, prompt=None, params=params or SamplingParams(),
                                   prefix_keys=prefix_keys(lead), prompt_segments=wire), embeds
        text, embeds = _split_prompt(prompt)
        embeds = _embeds_arg(embeds)
        keys = prefix_keys(text, embeds if isinstance(embeds, np.ndarray) else None)
        req = GenerateRequest(request_id=request_id, prompt=text, params=params or SamplingParams(), prefix_keys=keys)
        return req, embeds

    def submit(self, prompt: Any, params: SamplingParams | None = None, *,
               request_id: str | None = None) -> ray.ObjectRef:
        """Send one prompt; `ray.get` of the returned ref is its finished RequestOutput (sent again to
        another replica if its replica is lost meanwhile: cluster.completer)."""
        req, embeds = self._request(prompt, params, request_id)
        if embeds is not None and not isinstance(embeds, ray.ObjectRef):
            embeds = ray.put(embeds)
        if self._completer is None:
            self._completer = start_completer(self.app_name, REPLICA_DEPLOYMENT)
        return self._completer.complete.remote(req, [] if embeds is None else [embeds])

    def submit_chat(self, messages: list[dict], params: SamplingParams | None = None, *,
                    request_id: str | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> ray.ObjectRef:
        """Send one conversation (as `LLM.chat`; `{"type": "prompt_embeds", "data": tensor}` parts);
        `ray.get` of the returned ref is its finished RequestOutput."""
        chat = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                "chat_template_kwargs": chat_template_kwargs}
        return self.submit(chat, params, request_id=request_id)

    def generate(self, prompts: Any, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, timeout: float | None = None) -> list[RequestOutput]:
        """Outputs of every prompt, in input order (one prompt or a list of them)."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        return ray.get([self.submit(p, sp) for p, sp in zip(prompts, plist)], timeout=timeout)

    def stream(self, prompt: Any, params: SamplingParams | None = None, *,
               request_id: str | None = None) -> Iterator[CompletionDelta]:
        """Yield the new text/tokens of each completion as they are generated (several tokens per
        delta while the replica folds steps together). If the replica dies, the stream resumes on
        another one with no token repeated or missing (router.routing.stream_prompt)."""
        req, embeds = self._request(prompt, params, request_id)
        chunks = stream_prompt(self.handle, req, embeds)
        loop = _background_loop()
        try:
            while True:
                try:
                    chunk = asyncio.run_coroutine_threadsafe(chunks.__anext__(), loop).result()
                except StopAsyncIteration:
                    return
                if chunk.error is not None:
                    raise ValueError(chunk.error)
                yield from chunk.deltas
        finally:  # ends the replica's work too when the caller stopped early
            asyncio.run_coroutine_threadsafe(chunks.aclose(), loop).result()

    def abort(self, request_id: str, *, timeout_s: float = 60) -> bool:
        """Abort a request by id; True when a replica was running it (it then ends with
        finish_reason "abort" and frees its KV blocks).

        The abort goes to the replica this process sent the request to, else to every live
        replica. A replica the request has not reached yet ends it as soon as it arrives.
        """
        calls = [self.handle.abort.remote(request_id, ReplicaTarget(r)) for r in self._replicas_for(request_id)]
        return any([c.result(timeout_s=timeout_s) for c in calls])

    def _replicas_for(self, request_id: str) -> list[str]:
        router = request_router_of(self.handle)
        if router is None:  # no call from this process yet: one makes Serve start its router
            self.handle.get_load.remote().result(timeout_s=60)
            router = request_router_of(self.handle)
        sent_to = router.replica_of(request_id)
        return [sent_to] if sent_to is not None else router.live_replica_ids()

    def model_info(self):
        return self.handle.model_info.remote().result()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """An event loop on a daemon thread, where Client.stream runs the router's async stream."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="raylm-client-loop", daemon=True).start()
        return _LOOP


def connect(app_name: str = DEFAULT_APP_NAME, address: str | None = None) -> Client:
    """A client for the raylm application `app_name` on the current (or given) Ray cluster."""
    if not ray.is_initialized():
        ray.init(address=address or "auto")
    return Client(app_name, serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name))
