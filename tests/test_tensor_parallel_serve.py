"""A tensor-parallel replica (TP=2, gloo) behind real Ray Serve and HTTP, with the real `openai` client:
its greedy output equals one device's for text and embeds prompts; when one of its worker actors is
killed, requests end cleanly (completed elsewhere, an error event or a 503: never a 500 or a hang)
and Serve replaces the replica, whose new placement group brings new workers. Every wait has a
deadline."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import openai
import pytest
import ray
import requests
from openai import AsyncOpenAI, OpenAI

from serve_utils import b64_embeds, free_port, start_ray, start_serve, stop_all, wait_healthy

DEADLINE_S = 180
ENGINE = {"num_gpu_blocks_override": 256, "num_threads": 1, "max_model_len": 512}


def wait_for(check, what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def tp_workers() -> dict[str, str]:
    """Named tensor-parallel worker actors: name -> namespace."""
    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("raylm-tp-")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.engine_support import embedded_tokenizer, make_tiny_model

    tok = embedded_tokenizer()
    folder = tmp_path_factory.mktemp("tp-llama")
    make_tiny_model(folder, "llama", tok, tie_word_embeddings=False)
    tmp = start_ray("tpserve", num_cpus=4, object_store_mb=100)
    try:
        from cluster.app import run

        port = free_port()
        start_serve(port)
        run({"name": "raylm", "model": str(folder), "engine": {**ENGINE, "tensor_parallel_size": 2},
             "ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 1, "routing_stats_period_s": 0.5})
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        model = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        yield SimpleNamespace(base=base, model=model, folder=str(folder), tok=tok)
    finally:
        stop_all(tmp)


@pytest.fixture(scope="module")
def one_device(server):
    from cluster import LLM

    return LLM(model=server.folder, **ENGINE)


def test_greedy_output_equals_one_device(server, one_device):
    from cluster import SamplingParams

    oa = OpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    text = "The three primary colors are"
    expected = one_device.generate(text, params, use_tqdm=False)[0].outputs[0].text
    got = oa.completions.create(model=server.model, prompt=text, max_tokens=12, temperature=0.0,
                                extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected
    ids = server.tok(text).input_ids
    embeds = one_device.get_input_embeddings(ids)
    got = oa.completions.create(model=server.model, prompt="", max_tokens=12, temperature=0.0,
                                extra_body={"prompt_embeds": b64_embeds(embeds), "ignore_eos": True})
    assert got.choices[0].text == one_device.generate({"prompt_embeds": embeds}, params,
                                                      use_tqdm=False)[0].outputs[0].text
    assert len(tp_workers()) == 1  # rank 1 of the one replica


async def _stream(oa: AsyncOpenAI, model: str, started: asyncio.Event) -> str:
    finish = None
    try:
        stream = await oa.completions.create(model=model, prompt="Tell me a story", max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True})
        async for chunk in stream:
            started.set()
            finish = chunk.choices[0].finish_reason or finish
    except openai.APIStatusError as e:
        return f"http-{e.status_code}"
    except openai.APIError as e:
        return f"error-event-{(e.body or {}).get('type')}"
    return "completed" if finish == "length" else "cut"


def test_killed_worker_fails_the_replica_which_serve_replaces(server):
    (name, namespace), = tp_workers().items()

    async def scenario():
        oa = AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=DEADLINE_S)
        started = asyncio.Event()
        task = asyncio.create_task(_stream(oa, server.model, started))
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        ray.kill(ray.get_actor(name, namespace=namespace))
        return await asyncio.wait_for(task, DEADLINE_S)

    outcome = asyncio.run(scenario())
    assert outcome in ("completed", "http-503") or outcome.startswith("error-event-"), outcome
    assert outcome != "error-event-internal_server_error"
    # Serve replaces the replica (its health check fails): a new placement group, a new rank 1
    wait_for(lambda: (w := tp_workers()) and name not in w, "a new tensor-parallel worker")
    wait_healthy(server.base, DEADLINE_S)
    r = wait_for(lambda: (x := requests.post(f"{server.base}/v1/completions", timeout=60, json={
        "model": server.model, "prompt": "Hello", "max_tokens": 4})).status_code == 200 and [x], "a completion")[0]
    assert r.json()["usage"]["completion_tokens"] == 4
