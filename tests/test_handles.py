"""Python handles on the running app: `cluster.connect()`, results through `ray.get`.

Prompt embeds are `ray.put` once by the caller and passed by ObjectRef; the replica must receive
a numpy array resolved from the object store (never bytes or base64 text).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch

from serve_utils import free_port, start_ray, start_serve, stop_all

DEADLINE_S = 120  # every wait on the cluster ends by then


@pytest.fixture(scope="module")
def client():
    tmp = start_ray("handles", num_cpus=2)
    try:
        from cluster import connect
        from cluster.app import run

        start_serve(free_port())
        run({"name": "raylm", "engine": {"max_model_len": 1024}})
        yield connect()  # Ray is initialized: connects to this cluster
    finally:
        stop_all(tmp)


@pytest.fixture(scope="module")
def model_parts():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from replicas.loader import embedded_model_dir

    d = embedded_model_dir()
    with safe_open(f"{d}/model.safetensors", "pt") as f:
        table = f.get_tensor("model.embed_tokens.weight")
    return AutoTokenizer.from_pretrained(d), table


def sp(**kw):
    from cluster import SamplingParams

    return SamplingParams(**{"max_tokens": 6, "temperature": 0.0, **kw})


def get(refs):
    return ray.get(refs, timeout=DEADLINE_S)


def within_deadline(fn):
    """fn() run in a thread, waited for at most DEADLINE_S (a stream's next chunk has no timeout)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=DEADLINE_S)
    finally:
        pool.shutdown(wait=False)  # a hung call must not hold the test past its deadline


def ids_of(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def test_submit_returns_an_objectref_of_a_request_output(client):
    from cluster import RequestOutput

    ref = client.submit("The capital of France is", sp())
    assert isinstance(ref, ray.ObjectRef)
    out = get(ref)
    assert isinstance(out, RequestOutput) and out.finished
    assert out.outputs[0].finish_reason in ("length", "stop")
    assert 1 <= len(out.outputs[0].token_ids) <= 6 and out.outputs[0].text


def test_objectref_embeds_put_once_reused_and_equal_to_token_ids(client, model_parts):
    tok, table = model_parts
    ids = ids_of(tok, "Where is bigger, the moon or the sun?")
    ref = ray.put(table[ids].numpy())  # (seq_len, hidden_size) float32, put once
    outs = get([client.submit({"prompt_embeds": ref}, sp(), request_id=f"reuse-{i}") for i in range(2)])
    from_ids = get(client.submit({"prompt_token_ids": ids}, sp()))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == from_ids.outputs[0].token_ids
    assert outs[0].prompt_token_ids is None and outs[0].num_prompt_tokens == len(ids)
    # the object-store path: the replica got the array itself, resolved by Ray, not bytes or text
    seen = dict(client.handle.embeds_types_seen.remote().result(timeout_s=DEADLINE_S))
    assert seen["reuse-0"] == seen["reuse-1"] == "numpy.ndarray"


def test_generate_keeps_input_order(client, model_parts):
    tok, table = model_parts
    ids = ids_of(tok, "Please tell me about the capital of France.")
    prompts = ["Once upon a time", {"prompt_embeds": torch.as_tensor(table[ids])},
               {"prompt_token_ids": ids}, {"prompt": "Water boils at"}]
    outs = client.generate(prompts, sp(), timeout=DEADLINE_S)
    singles = [get(client.submit(p, sp())) for p in prompts]
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in singles]
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids  # embeds == the same tokens


def test_stream_yields_deltas_that_add_up(client):
    deltas = within_deadline(lambda: list(client.stream("Tell me a fact about the sea.", sp(max_tokens=8))))
    full = get(client.submit("Tell me a fact about the sea.", sp(max_tokens=8))).outputs[0]
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [d.finish_reason for d in deltas if d.finish_reason] == [full.finish_reason]


def test_bad_embeds_raise_value_error_and_replica_survives(client):
    ref = ray.put(np.zeros((3, 17), dtype=np.float32))  # wrong hidden size
    with pytest.raises(ValueError):
        get(client.submit({"prompt_embeds": ref}, sp()))
    assert get(client.submit("Still alive?", sp(max_tokens=2))).finished
