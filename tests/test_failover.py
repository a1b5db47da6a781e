"""Streams that survive a replica's death: the router resumes each unfinished completion on another
replica with the prompt plus the tokens already sent, so the client sees no error and no repeated
or missing token, and greedy (and seeded) output equals an uninterrupted run's.

First in-process (the continuation prompt on one engine), then through real Ray Serve with two
replicas of the embedded model: a replica's actor killed (`ray.kill`) or its engine failed
(`fault_injection`) mid-stream, over the handle (`Client.stream`) and over HTTP with the `openai`
client. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import openai
import pytest
import ray
import requests
from openai import AsyncOpenAI

from serve_utils import live_replicas, retries, serving_replicas, wait_for, within

DEADLINE_S = 180
TOKENS = 40


def sp(**kw):
    from replicas.sampling_params import SamplingParams

    return SamplingParams(**{"max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True, **kw})


# -- in-process: the continuation prompt ----------------------------------------------------------
def _resumed(llm, prompt, params, cut: int):
    """(uninterrupted output, the output of a run resumed after `cut` tokens, the held text)."""
    from replicas.continuation import continuation_prompt
    from replicas.protocol import Continuation

    full = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    sent_text = llm.get_tokenizer().decode(full.token_ids[:cut])[:-3]  # as if 3 characters were held back
    assert full.text.startswith(sent_text)
    cont = Continuation(0, full.token_ids[:cut], sent_text)
    raw = prompt if isinstance(prompt, (str, dict)) else {"prompt_token_ids": prompt}
    resumed_prompt, resumed_params, held = continuation_prompt(raw, params, cont, llm.get_tokenizer())
    rest = _generate_with_offset(llm, resumed_prompt, resumed_params, cut)
    return full, rest, sent_text + held


def _generate_with_offset(llm, prompt, params, offset: int):
    engine = llm.engine
    rid = f"resume-{time.monotonic_ns()}"
    engine.add_request(rid, prompt, params, final_only=True, output_offset=offset)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.outputs[0]
    raise AssertionError("the resumed request did not finish")


@pytest.mark.parametrize("kind", ["text", "embeds"])
@pytest.mark.parametrize("seeded", [False, True])
def test_resumed_run_continues_the_uninterrupted_one(embedded_llm, kind, seeded):
    ids = embedded_llm.get_tokenizer()("The history of the printing press").input_ids
    prompt = "The history of the printing press" if kind == "text" else \
        {"prompt_embeds": embedded_llm.get_input_embeddings(ids)}
    params = sp(max_tokens=24, **({"temperature": 0.9, "seed": 11} if seeded else {}))
    full, rest, text_before = _resumed(embedded_llm, prompt, params, cut=9)
    assert full.token_ids[:9] + rest.token_ids == full.token_ids
    assert text_before + rest.text == full.text
    assert rest.finish_reason == full.finish_reason == "length"


# -- through Ray Serve ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with serving_replicas("failover", {
            "name": "raylm", "engine": {"max_model_len": 1024, "num_threads": 1, "fault_injection": True},
            "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "routing_stats_period_s": 0.5,
            "health_check_period_s": 1}, DEADLINE_S) as app:
        yield app


def busiest_replica(server) -> str:
    from replicas.protocol import ReplicaTarget

    loads = [server.handle.get_load.remote(ReplicaTarget(r)).result(timeout_s=DEADLINE_S)
             for r in live_replicas(server.client)]
    return max(loads, key=lambda load: load.num_streams).replica_id


def kill_replica(replica_id: str) -> None:
    ray.kill(ray.get_actor(f"SERVE_REPLICA::raylm#Replica#{replica_id}", namespace="serve"), no_restart=True)


def fail_engine(server, replica_id: str) -> None:
    from replicas.protocol import ReplicaTarget

    assert server.handle.inject_fault.remote(ReplicaTarget(replica_id)).result(timeout_s=DEADLINE_S) == replica_id


def wait_two_live(server, lost: str) -> None:
    """Serve replaces the lost replica; both routers (this process's and the HTTP one) see two."""
    wait_for(lambda: (ids := live_replicas(server.client)) and len(ids) == 2 and lost not in ids,
             "a replacement replica", DEADLINE_S)
    wait_for(lambda: requests.get(f"{server.base}/health", timeout=30).json().get("live_replicas") == 2,
             "the HTTP router to see two live replicas", DEADLINE_S)



def stream_with_a_loss(server, prompt, params, request_id: str, lose) -> tuple[list[int], str, list]:
    """Client.stream one prompt; after a few tokens, `lose(replica running it)`; all it yielded."""
    from router.routing import request_router_of

    ids, text, finishes, lost = [], [], [], []
    for d in server.client.stream(prompt, params, request_id=request_id):
        ids += d.token_ids
        text.append(d.text)
        if d.finish_reason:
            finishes.append(d.finish_reason)
        if len(ids) >= 6 and not lost:
            replica = request_router_of(server.client.handle).replica_of(request_id)
            lose(replica)
            lost.append(replica)
    assert lost, "the stream finished before a replica could be lost"
    return ids, "".join(text), finishes + lost


@pytest.mark.parametrize("how", ["actor_killed", "engine_failed"])
def test_handle_stream_resumes_on_the_other_replica(server, how):
    uninterrupted = ray.get(server.client.submit("Tell me about the ocean.", sp()), timeout=DEADLINE_S).outputs[0]
    lose = kill_replica if how == "actor_killed" else (lambda r: fail_engine(server, r))
    ids, text, (*finishes, lost) = within(
        lambda: stream_with_a_loss(server, "Tell me about the ocean.", sp(), f"resume-{how}", lose), DEADLINE_S)
    assert ids == uninterrupted.token_ids and text == uninterrupted.text
    assert finishes == ["length"]
    wait_two_live(server, lost)


def test_submitted_requests_finish_on_the_other_replica_when_theirs_is_killed(server):
    """ray.get(client.submit(...)): a request whose replica dies is sent again (cluster.completer)."""
    from replicas.protocol import ReplicaTarget

    prompts = ["Tell me about mountains.", "What is a glacier?", "Describe the desert at night.",
               "How do tides work?"]
    reference = [o.outputs[0] for o in ray.get([server.client.submit(p, sp()) for p in prompts], timeout=DEADLINE_S)]
    refs = [server.client.submit(p, sp()) for p in prompts]

    def running_replica():
        loads = [server.handle.get_load.remote(ReplicaTarget(r)).result(timeout_s=DEADLINE_S)
                 for r in live_replicas(server.client)]
        busy = [load for load in loads if load.num_streams > 0]
        return max(busy, key=lambda load: load.num_streams).replica_id if busy else None

    victim = wait_for(running_replica, "a replica running a submitted request", DEADLINE_S)
    kill_replica(victim)
    outs = [o.outputs[0] for o in ray.get(refs, timeout=DEADLINE_S)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert [o.text for o in outs] == [o.text for o in reference]
    assert all(o.finish_reason == "length" for o in outs)
    wait_two_live(server, victim)


def test_embeds_stream_resumes_with_seeded_sampling(server):
    from transformers import AutoTokenizer

    from replicas.loader import embedded_model_dir
    from safetensors import safe_open

    d = embedded_model_dir()
    ids = AutoTokenizer.from_pretrained(d)("Where do comets come from?").input_ids
    with safe_open(f"{d}/model.safetensors", "pt") as f:
        embeds = ray.put(np.ascontiguousarray(f.get_tensor("model.embed_tokens.weight")[ids].numpy()))
    params = sp(temperature=0.8, seed=1234)
    uninterrupted = ray.get(server.client.submit({"prompt_embeds": embeds}, params), timeout=DEADLINE_S).outputs[0]
    out_ids, text, (*finishes, lost) = within(
        lambda: stream_with_a_loss(server, {"prompt_embeds": embeds}, params, "resume-embeds", kill_replica))
    assert out_ids == uninterrupted.token_ids and text == uninterrupted.text
    assert finishes == ["length"]
    wait_two_live(server, lost)


def test_http_streams_and_plain_requests_finish_unbroken_when_a_replica_is_killed(server):
    prompts = ["Write a short note about rivers.", "Describe a busy market.", "Why do cats purr?",
               "Explain how bridges stay up."]

    async def scenario():
        oa = AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)
        greedy = dict(model=server.model, max_tokens=TOKENS, temperature=0.0, extra_body={"ignore_eos": True})
        reference = [(await oa.completions.create(prompt=p, **greedy)).choices[0].text for p in prompts]
        progress = [0] * len(prompts)

        async def streamed(i: int) -> tuple[str, list]:
            text, finishes = [], []
            stream = await oa.completions.create(prompt=prompts[i], stream=True, **greedy)
            async for chunk in stream:
                for c in chunk.choices:
                    text.append(c.text)
                    progress[i] += 1
                    if c.finish_reason:
                        finishes.append(c.finish_reason)
            return "".join(text), finishes

        async def plain(i: int) -> str:
            return (await oa.completions.create(prompt=prompts[i], **greedy)).choices[0].text

        streams = [asyncio.create_task(streamed(i)) for i in range(len(prompts))]
        plains = [asyncio.create_task(plain(i)) for i in range(2)]
        deadline = time.monotonic() + DEADLINE_S
        while min(progress) < 4:
            assert time.monotonic() < deadline, "streams did not start"
            await asyncio.sleep(0.05)
        victim = await asyncio.to_thread(busiest_replica, server)
        await asyncio.to_thread(kill_replica, victim)
        results = await asyncio.wait_for(asyncio.gather(*streams), DEADLINE_S)
        plain_texts = await asyncio.wait_for(asyncio.gather(*plains), DEADLINE_S)
        return reference, results, plain_texts, victim

    before = retries(server.base)
    reference, results, plain_texts, victim = asyncio.run(scenario())
    assert [text for text, _ in results] == reference
    assert [finishes for _, finishes in results] == [["length"]] * len(reference)
    assert plain_texts == reference[:2]
    assert retries(server.base) > before, "the killed replica was running none of the requests"
    wait_two_live(server, victim)


def test_each_of_n_completions_resumes_with_its_own_seed(server):
    """n = 2 sampled completions: each unfinished one resumes as its own request, seeded as it was."""
    async def scenario():
        oa = AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)
        sampled = dict(model=server.model, prompt="Name some colours:", max_tokens=TOKENS, n=2, temperature=0.8,
                       seed=99, extra_body={"ignore_eos": True})
        reference = sorted((c.index, c.text) for c in (await oa.completions.create(**sampled)).choices)
        texts, finishes, victim = {0: [], 1: []}, [], None
        stream = await oa.completions.create(stream=True, **sampled)
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index].append(c.text)
                finishes += [c.finish_reason] if c.finish_reason else []
            if victim is None and min(len(t) for t in texts.values()) >= 3:
                victim = await asyncio.to_thread(busiest_replica, server)
                await asyncio.to_thread(kill_replica, victim)
        return reference, sorted((i, "".join(t)) for i, t in texts.items()), finishes, victim

    before = retries(server.base)
    reference, streamed, finishes, victim = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert streamed == reference and finishes == ["length", "length"]
    assert victim is not None and retries(server.base) > before
    wait_two_live(server, victim)


def test_no_replica_left_ends_the_stream_with_a_clean_error_event(server):
    replicas = live_replicas(server.client)

    async def scenario():
        oa = AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)
        stream = await oa.completions.create(model=server.model, prompt="Count slowly:", max_tokens=600,
                                             stream=True, extra_body={"ignore_eos": True})
        got = 0
        try:
            async for chunk in stream:
                got += len(chunk.choices)
                if got == 4:
                    for r in replicas:
                        await asyncio.to_thread(fail_engine, server, r)
        except openai.APIError as e:
            return got, (e.body or {}).get("type")
        return got, None

    got, error_type = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert got >= 4 and error_type == "service_unavailable_error"
    for r in replicas:
        wait_for(lambda: r not in live_replicas(server.client), f"replica {r} to be replaced", DEADLINE_S)
    wait_for(lambda: len(live_replicas(server.client)) == 2, "two replacement replicas", DEADLINE_S)
