"""A replica whose engine fails, through real Ray Serve and HTTP, with the real `openai` client.

Two replicas of a tiny random model. The failure is the replicas' `fault_injection` debug hook:
the engine loop raises at its next turn, on the same path as an exception in a step (that path is
also tested in-process with a real cause in test_async_engine.py). Clients must get a completed
answer (retried on the other replica), a 503 or an SSE error event: never a 500, never a hang.
Serve replaces the failed replica once its health check fails. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio

import openai
import pytest
import ray
import requests
from openai import AsyncOpenAI

from serve_utils import live_replicas, retries, serving_replicas, wait_for, within
from tiny_model import TINY_ENGINE, tiny_config

DEADLINE_S = 120  # every wait in this module ends by then
LONG_TOKENS = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_replicas("fail", {
            "name": "raylm", "model": tiny_config(tmp_path_factory.mktemp("tiny")),
            "engine": {**TINY_ENGINE, "fault_injection": True}, "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 0.5}, "routing_stats_period_s": 0.5,
            "health_check_period_s": 1}, DEADLINE_S) as app:
        yield app


# -- helpers ------------------------------------------------------------------------------------




def openai_client(server) -> AsyncOpenAI:
    """A client for one asyncio.run (it is bound to the loop it first runs on)."""
    return AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)


def inject_fault(server, replica_id: str) -> None:
    from replicas.protocol import ReplicaTarget

    hit = server.handle.inject_fault.remote(ReplicaTarget(replica_id)).result(timeout_s=DEADLINE_S)
    assert hit == replica_id


def replica_actor_gone(replica_id: str) -> bool:
    try:
        ray.get_actor(f"SERVE_REPLICA::raylm#Replica#{replica_id}", namespace="serve")
        return False
    except ValueError:
        return True


def wait_replaced(server, failed: str) -> None:
    """Serve stops the failed replica (its health check raises) and starts another."""
    wait_for(lambda: replica_actor_gone(failed), f"Serve to stop replica {failed}")
    wait_for(lambda: (ids := live_replicas(server.client)) and len(ids) == 2 and failed not in ids,
             "a replacement replica")
    wait_for(lambda: requests.get(f"{server.base}/health", timeout=30).json().get("live_replicas") == 2,
             "the HTTP router to see two live replicas")


async def completion(oa: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> str:
    """"completed" (every token generated), or how it failed: "http-<status>"."""
    try:
        out = await oa.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                          extra_body={"ignore_eos": True})
    except openai.APIStatusError as e:
        return f"http-{e.status_code}"
    return "completed" if out.usage.completion_tokens == max_tokens else f"short-{out.usage.completion_tokens}"


async def streamed(oa: AsyncOpenAI, model: str, prompt: str, first_token: asyncio.Event) -> str:
    """"completed", "error-event-<type>" (an SSE error after tokens), "http-<status>" or "cut"."""
    finish = None
    try:
        stream = await oa.completions.create(model=model, prompt=prompt, max_tokens=LONG_TOKENS, stream=True,
                                             extra_body={"ignore_eos": True})
        async for chunk in stream:
            for c in chunk.choices:
                first_token.set()
                finish = c.finish_reason or finish
    except openai.APIStatusError as e:
        return f"http-{e.status_code}"
    except openai.APIError as e:  # the error event of a stream that had started
        return f"error-event-{(e.body or {}).get('type')}"
    return "completed" if finish == "length" else "cut"


# -- tests --------------------------------------------------------------------------------------
def test_client_abort_reaches_the_replica_that_runs_the_request(server):
    from cluster import SamplingParams

    params = SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)
    refs = {f"abort-me-{i}": server.client.submit(f"Story {i}:", params, request_id=f"abort-me-{i}")
            for i in range(6)}  # spread over both replicas
    for rid in refs:
        server.client.abort(rid)
    outs = ray.get(list(refs.values()), timeout=DEADLINE_S)
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] * 6
    assert all(len(o.outputs[0].token_ids) < LONG_TOKENS for o in outs)


def test_abort_of_a_running_stream_reports_it_was_running(server):
    from cluster import SamplingParams

    deltas = server.client.stream("Tell me everything:", SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True),
                                  request_id="running-stream")
    within(lambda: next(deltas))  # it runs on some replica now
    assert server.client.abort("running-stream") is True
    finishes = within(lambda: [d.finish_reason for d in deltas if d.finish_reason])
    assert finishes == ["abort"]


def test_failed_idle_replica_gets_no_more_work(server):
    """A replica that fails while idle: requests go to the other one at once, all succeed."""
    failed = live_replicas(server.client)[0]
    before = retries(server.base)
    inject_fault(server, failed)

    async def one_by_one():
        oa = openai_client(server)
        return [await completion(oa, server.model, f"Question {i}?", 8) for i in range(8)]

    assert asyncio.run(one_by_one()) == ["completed"] * 8
    # at most the first request met the failed replica (and was sent again) before the router knew
    assert retries(server.base) - before <= 1
    wait_replaced(server, failed)


def test_failure_mid_run_retries_or_ends_each_request_cleanly(server):
    failed = live_replicas(server.client)[1]
    before = retries(server.base)

    async def scenario():
        oa = openai_client(server)
        started = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.create_task(streamed(oa, server.model, f"Stream {i}:", started[i])) for i in range(4)]
        plain = [asyncio.create_task(completion(oa, server.model, f"Plain {i}:", LONG_TOKENS)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), DEADLINE_S)
        await asyncio.to_thread(inject_fault, server, failed)
        return (await asyncio.wait_for(asyncio.gather(*streams), DEADLINE_S),
                await asyncio.wait_for(asyncio.gather(*plain), DEADLINE_S))

    stream_outcomes, plain_outcomes = asyncio.run(scenario())
    # non-streaming requests on the failed replica were sent again: every one completes
    assert plain_outcomes == ["completed"] * 4
    # streams that had sent tokens from the failed replica end with a 503-type error event
    assert set(stream_outcomes) <= {"completed", "error-event-service_unavailable_error"}, stream_outcomes
    hit = stream_outcomes.count("error-event-service_unavailable_error") + retries(server.base) - before
    assert hit >= 1, "the failed replica was running none of the requests"
    wait_replaced(server, failed)
    assert asyncio.run(completion(openai_client(server), server.model, "After the replacement", 8)) == "completed"
