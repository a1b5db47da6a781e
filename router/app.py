"""The HTTP face: a FastAPI ingress deployment speaking OpenAI's completions API (vLLM's flavour).

Per request: parse (JSON or msgpack), validate, decode embeds ONCE and `ray.put` them, send
each prompt to a replica (router.routing), and answer as JSON, msgpack or SSE.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (`request: Request`) at runtime, through Serve's ingress wrapper class.
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from replicas.protocol import GenerateChunk, GenerateRequest, LoadReport, ModelInfo
from router import direct_http, errors
from router.chat import build_chat_prompt
from router.chat_responses import ChatChoice, ChatHeader
from router.chat_schemas import ChatCompletionRequest
from router.embeds import EmbedsError, decode_embeds_entry
from router.errors import APIError, bad_request, quote, unavailable
from router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.metrics import Metrics, observe_many
from router.metrics_board import BoardLink
from router.msgpack_codec import (MSGPACK_CONTENT_TYPE, MsgpackBodyError, container_budget, decode_msgpack_body,
                                  encode_msgpack_response)
from router.responses import Choice, CompletionHeader, prompt_logprobs_json, usage
from router.routing import prefix_keys, request_router_of, stream_prompt
from router.schemas import CompletionRequest

logger = logging.getLogger(__name__)

app = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(app)

_MSGPACK_TYPES = {MSGPACK_CONTENT_TYPE, "application/x-msgpack", "application/vnd.msgpack"}


@dataclass
class PromptJob:
    """One prompt of an HTTP request, sent to one replica."""

    index: int  # position among the request's prompts (embeds first)
    request: GenerateRequest
    embeds_ref: ray.ObjectRef | None
    choices: list[Choice]
    stream: AsyncIterator[GenerateChunk] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    pending: list[GenerateChunk] = field(default_factory=list)


def _too_long(what: str, n: int, max_tokens: int | None, max_model_len: int) -> str:
    if max_tokens is None:
        return f"{what} has {n} tokens, leaving no room to generate within max_model_len ({max_model_len})"
    return (f"{what} has {n} tokens and max_tokens is {max_tokens}: together more than max_model_len "
            f"({max_model_len})")


def _sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks)


async def _close(jobs: list[PromptJob]) -> None:
    for j in jobs:
        if j.stream is not None:
            try:
                await j.stream.aclose()
            except Exception:  # noqa: BLE001 - closing a failed stream must not mask the real error
                pass


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica (a Router built by hand)
        return "raylm"


@serve.ingress(app)
class Router:
    def __init__(self, replicas, api_key: str | None = None, served_model_name: str | list[str] | None = None,
                 max_body_bytes: int = 256 * 1024 * 1024, max_embeds_bytes: int | None = None,
                 max_prompts: int = 1024, direct_port: int | None = None, direct_host: str = "0.0.0.0") -> None:
        """direct_port: also answer HTTP on this port of the Router's node, skipping Serve's proxy
        (router.direct_http; every Router of the node shares the port)."""
        self.replicas = replicas
        self.api_key = api_key or os.environ.get("RAYLM_API_KEY") or None
        names = served_model_name or []
        self.extra_model_names = [names] if isinstance(names, str) else list(names)
        self.max_body_bytes = max_body_bytes
        self.max_embeds_bytes = max_embeds_bytes
        self.max_prompts = max_prompts
        self.metrics = Metrics(self._replica_stats, self._num_live_replicas)
        self._board = BoardLink(_app_name(), uuid.uuid4().hex, self.metrics.registry)
        self._board.start()
        self._info: ModelInfo | None = None
        self._tokenizer = None
        self._info_lock: asyncio.Lock | None = None
        self._direct_server = direct_http.start(app, direct_host, direct_port) if direct_port else None

    # -- shared state -------------------------------------------------------------------------
    def _replica_stats(self) -> dict[str, LoadReport]:
        r = request_router_of(self.replicas)
        return r.replica_stats() if r is not None else {}

    def _num_live_replicas(self) -> int:
        r = request_router_of(self.replicas)
        return r.num_live_replicas if r is not None else 0

    async def _from_replica(self, attr: str, method: str):
        """A model fact every replica shares (its info, its tokenizer): asked once, then kept."""
        if getattr(self, attr) is None:
            self._info_lock = self._info_lock or asyncio.Lock()
            async with self._info_lock:
                if getattr(self, attr) is None:
                    try:
                        value = await asyncio.wait_for(getattr(self.replicas, method).remote(), timeout=60)
                    except (asyncio.TimeoutError, ray.exceptions.RayError, serve.exceptions.RayServeException):
                        raise unavailable("no replica answered; the model may still be loading") from None
                    setattr(self, attr, value)
        return getattr(self, attr)

    async def _model_info(self) -> ModelInfo:
        return await self._from_replica("_info", "model_info")

    def _model_names(self, info: ModelInfo) -> list[str]:
        return [info.name] + [n for n in self.extra_model_names if n != info.name]

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("invalid or missing API key", 401, code="invalid_api_key")

    # -- request body -------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(f"request body is {declared} bytes, the limit is {self.max_body_bytes}", 413)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise APIError(f"request body exceeds the limit of {self.max_body_bytes} bytes", 413)
            parts.append(part)
        raw = b"".join(parts)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in _MSGPACK_TYPES:
            try:
                return decode_msgpack_body(raw, self.max_body_bytes, max_containers=container_budget(self.max_prompts))
            except MsgpackBodyError as e:
                raise APIError(e.message, e.status) from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad_request("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # -- turning a request into prompt jobs ---------------------------------------------------
    def _decode_embeds(self, entries: list, info: ModelInfo,
                       max_tokens: int | None) -> list[tuple[list[str], ray.ObjectRef]]:
        """(prefix keys, object-store ref) of each embeds entry; runs in a worker thread, and puts
        nothing in the object store unless every entry is good."""
        longest = info.max_model_len - (max_tokens or 1)
        cap = self.max_embeds_bytes or info.max_model_len * info.hidden_size * 4
        arrays = []
        for i, e in enumerate(entries):
            try:  # str: base64 torch.save; bytes: torch.save (msgpack); dict: raw dtype/shape/data
                arr = decode_embeds_entry(e, hidden_size=info.hidden_size, max_bytes=cap)
            except EmbedsError as err:
                raise APIError(f"prompt_embeds[{i}]: {err.message}", err.status, param="prompt_embeds") from None
            if arr.shape[0] > longest:
                raise APIError(_too_long(f"prompt_embeds[{i}]", arr.shape[0], max_tokens, info.max_model_len),
                               400, param="prompt_embeds")
            arrays.append(arr)
        return [(prefix_keys(None, arr), ray.put(arr)) for arr in arrays]

    async def _jobs(self, req: CompletionRequest, info: ModelInfo, request_id: str) -> list[PromptJob]:
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (beam search is not supported)", "best_of")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        try:
            params = req.sampling_params()
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        if req.echo and params.logprobs is not None and params.prompt_logprobs is None:
            # echo with logprobs scores the echoed prompt tokens too
            params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
        texts, embeds = req.text_prompts(), req.embeds_entries()
        if not texts and not embeds:
            raise bad_request(errors.EMPTY_PROMPT, "prompt")
        if embeds and req.echo:
            raise bad_request(errors.ECHO_WITH_EMBEDS, "echo")
        if embeds and req.prompt_logprobs is not None:
            raise bad_request(errors.PROMPT_LOGPROBS_WITH_EMBEDS, "prompt_logprobs")
        if len(texts) + len(embeds) > self.max_prompts:
            raise bad_request(f"at most {self.max_prompts} prompts per request", "prompt")
        for i, t in enumerate(texts):
            if len(t) == 0:
                raise bad_request(f"prompt[{i}] is empty", "prompt")
            bad = None if isinstance(t, str) else next((x for x in t if not 0 <= x < info.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt[{i}]: {errors.out_of_vocabulary(bad)}", "prompt")
        # Lengths the replica would refuse are refused before any prompt is sent (text prompts are
        # tokenized only there: a refusal then aborts the request's other prompts).
        longest = info.max_model_len - (params.max_tokens or 1)
        for i, t in enumerate(texts):
            if not isinstance(t, str) and len(t) > longest:
                raise bad_request(_too_long(f"prompt[{i}]", len(t), params.max_tokens, info.max_model_len), "prompt")
        decoded = await asyncio.to_thread(self._decode_embeds, embeds, info, params.max_tokens) if embeds else []

        jobs, n = [], params.n
        prompts = [(None, keys, ref) for keys, ref in decoded] + [(t, prefix_keys(t), None) for t in texts]
        for i, (text, keys, ref) in enumerate(prompts):
            greq = GenerateRequest(request_id=f"{request_id}-{i}", prompt=text, params=params,
                                   prefix_keys=keys, echo=req.echo)
            echo = text if (req.echo and isinstance(text, str)) else ""
            choices = [Choice(index=i * n + k, echo_prefix=echo, want_logprobs=params.logprobs is not None,
                              show_prompt_logprobs=req.prompt_logprobs is not None) for k in range(n)]
            jobs.append(PromptJob(index=i, request=greq, embeds_ref=ref, choices=choices))
        return jobs

    async def _start(self, jobs: list[PromptJob], stream: bool) -> None:
        """Send every prompt and wait until each is accepted; a refusal fails the whole request."""

        async def first(job: PromptJob) -> None:
            job.stream = stream_prompt(self.replicas, job.request, job.embeds_ref, on_retry=self.metrics.retries.inc)
            chunk = await job.stream.__anext__()
            if chunk.error is not None:
                raise bad_request(chunk.error, "prompt_embeds" if job.embeds_ref is not None else "prompt")
            if chunk.prompt_text is not None:
                for c in job.choices:
                    c.echo_prefix, c.offset = chunk.prompt_text, len(chunk.prompt_text)
            for c in job.choices:
                c.echo_tokens = chunk.prompt_tokens
            if not chunk.accepted or chunk.deltas or chunk.finished:  # the first output may ride along
                job.pending.append(chunk)

        results = await asyncio.gather(*(first(j) for j in jobs), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await _close(jobs)
            api = [f for f in failures if isinstance(f, APIError)]
            if api:
                raise min(api, key=lambda e: e.status)  # a client error wins over 429/503
            raise failures[0]

    # -- consuming replica output -------------------------------------------------------------
    async def _chunks(self, job: PromptJob, t0: float) -> AsyncIterator[GenerateChunk]:
        async def source():
            for c in job.pending:
                yield c
            async for c in job.stream:
                yield c

        # stream_prompt hands on each token once, also when a lost replica's work resumed elsewhere.
        async for chunk in source():
            if chunk.error is not None:
                raise bad_request(chunk.error)
            if chunk.prompt_logprobs is not None:
                formatted = prompt_logprobs_json(chunk.prompt_logprobs)
                for c in job.choices:
                    c.set_prompt_logprobs(chunk.prompt_token_ids, chunk.prompt_logprobs, formatted)
            job.num_prompt_tokens = chunk.num_prompt_tokens or job.num_prompt_tokens
            job.num_cached_tokens = chunk.num_cached_tokens or job.num_cached_tokens
            ntok = chunk.num_tokens
            if ntok:
                now = time.perf_counter()
                if job.first_token_at is None:
                    self.metrics.ttft.observe(now - t0)
                    job.first_token_at = now
                else:
                    observe_many(self.metrics.itl, (now - job.last_token_at) / ntok, ntok)
                job.last_token_at = now
            yield chunk

    def _account(self, jobs: list[PromptJob], t0: float) -> dict:
        prompt = sum(j.num_prompt_tokens for j in jobs)
        completion = sum(c.num_tokens for j in jobs for c in j.choices)
        cached = sum(j.num_cached_tokens for j in jobs)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.generation_tokens.inc(completion)
        self.metrics.e2e.observe(time.perf_counter() - t0)
        return usage(prompt, completion, cached)

    async def _collect(self, jobs: list[PromptJob], t0: float) -> None:
        async def run(job: PromptJob) -> None:
            async for chunk in self._chunks(job, t0):
                for d in chunk.deltas:
                    job.choices[d.index].apply(d)

        tasks = [asyncio.create_task(run(j)) for j in jobs]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed or the client left: stop the others (and their replica requests)
            await _cancel(tasks)
            await _close(jobs)

    async def _sse(self, jobs: list[PromptJob], header: CompletionHeader, req: CompletionRequest,
                   t0: float) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        opts = req.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)

        async def pump(job: PromptJob) -> None:
            try:
                async for chunk in self._chunks(job, t0):
                    await queue.put((job, chunk))
                await queue.put((job, None))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported to the client as an error event
                await queue.put((job, e))

        tasks = [asyncio.create_task(pump(j)) for j in jobs]
        try:
            remaining = len(jobs)
            while remaining:
                job, item = await queue.get()
                if item is None:
                    remaining -= 1
                    for c in job.choices:  # exactly one finish_reason per choice, whatever happened
                        if c.finish_reason is None:
                            yield _sse_event(header.chunk([c.aborted()]))
                    continue
                if isinstance(item, BaseException):
                    err = item if isinstance(item, APIError) else APIError(
                        f"generation failed: {type(item).__name__}", 500, code="internal_error")
                    yield _sse_event(err.body())
                    break
                for d in item.deltas:
                    choice = job.choices[d.index]
                    if choice.finish_reason is not None:
                        continue
                    piece = choice.apply(d)
                    u = self._partial_usage(jobs) if continuous else None  # this chunk's tokens included
                    yield _sse_event(header.chunk([piece], u))
            else:
                u = self._account(jobs, t0)
                if opts and opts.include_usage:
                    yield _sse_event(header.chunk([], u))
            yield "data: [DONE]\n\n"
        finally:
            await _cancel(tasks)
            await _close(jobs)

    @staticmethod
    def _partial_usage(jobs: list[PromptJob]) -> dict:
        return usage(sum(j.num_prompt_tokens for j in jobs), sum(c.num_tokens for j in jobs for c in j.choices))

    # -- answering ----------------------------------------------------------------------------
    async def _answer(self, request: Request, respond) -> Response:
        """Auth and body, then `respond(request, body, t0)`; the request is counted by its status."""
        t0 = time.perf_counter()
        status = 200
        try:
            self._check_auth(request)
            body = await self._read_body(request)
            return await respond(request, body, t0)
        except APIError as e:
            status = e.status
            raise
        except ValidationError:  # errors.install answers 400
            status = 400
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.requests.labels(status=str(status)).inc()

    async def _checked_model_info(self, model: str | None) -> ModelInfo:
        info = await self._model_info()
        if model is not None and model not in self._model_names(info):
            raise APIError(f"the model {quote(model)} does not exist", 404, param="model", code="model_not_found")
        return info

    async def _respond(self, request: Request, jobs: list[PromptJob], header, req, t0: float) -> Response:
        """Stream the jobs' output as SSE, or collect it into one JSON (or msgpack) body."""
        if req.stream:
            return StreamingResponse(self._sse(jobs, header, req, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": header.id})
        await self._collect(jobs, t0)
        result = header.completion([c.final() for j in jobs for c in j.choices], self._account(jobs, t0))
        if MSGPACK_CONTENT_TYPE in request.headers.get("accept", ""):
            return Response(encode_msgpack_response(result), media_type=MSGPACK_CONTENT_TYPE)
        return JSONResponse(result)

    # -- endpoints ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, self._complete)

    async def _complete(self, request: Request, body: dict, t0: float) -> Response:
        req = CompletionRequest.model_validate(body)
        info = await self._checked_model_info(req.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = await self._jobs(req, info, request_id)
        await self._start(jobs, req.stream)
        return await self._respond(request, jobs, CompletionHeader(id=request_id, model=req.model or info.name),
                                   req, t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, self._chat)

    async def _chat(self, request: Request, body: dict, t0: float) -> Response:
        req = ChatCompletionRequest.model_validate(body)
        req.check_supported()
        try:
            params = req.sampling_params()
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        info = await self._checked_model_info(req.model)
        tokenizer = await self._from_replica("_tokenizer", "tokenizer")
        prompt = await asyncio.to_thread(build_chat_prompt, req, tokenizer, info, max_tokens=params.max_tokens,
                                         max_embeds_bytes=self.max_embeds_bytes)
        if prompt.num_tokens > info.max_model_len - (params.max_tokens or 1):
            raise bad_request(_too_long("the chat prompt", prompt.num_tokens, params.max_tokens, info.max_model_len),
                              "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        greq = GenerateRequest(request_id=f"{request_id}-0", prompt=prompt.token_ids, params=params,
                               prefix_keys=prompt.prefix_keys, prompt_segments=prompt.segments)
        choices = [ChatChoice(index=k, want_logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)
                   for k in range(params.n)]
        ref = await asyncio.to_thread(ray.put, prompt.embeds) if prompt.embeds is not None else None
        jobs = [PromptJob(index=0, request=greq, embeds_ref=ref, choices=choices)]
        await self._start(jobs, req.stream)
        return await self._respond(request, jobs, ChatHeader(id=request_id, model=req.model or info.name), req, t0)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check_auth(request)
        info = await self._model_info()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "raylm", "root": info.name,
                 "parent": None, "max_model_len": info.max_model_len} for name in self._model_names(info)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self):
        await self._model_info()
        live = self._num_live_replicas()
        if live == 0:
            raise unavailable()
        return {"status": "ok", "live_replicas": live}

    @app.get("/metrics")
    async def metrics_endpoint(self):
        if request_router_of(self.replicas) is None:
            try:  # Serve starts the request router (whose replica reports these gauges read) at a first call
                await self._model_info()
            except APIError:
                pass  # no replica answers yet: the router's own metrics still render
        self._board.start()
        return Response(self.metrics.render(await self._board.others()), media_type=METRICS_CONTENT_TYPE)

