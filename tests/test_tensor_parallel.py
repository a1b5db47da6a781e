"""Tensor parallelism on the CPU (gloo): TP=2 gives TP=1's greedy tokens for a random Llama, a random
Qwen2 and the embedded default (whose 3 KV heads split unevenly over 2 ranks), with text, token-id
and embeds prompts, chunked prefill and prefix-cache hits; a worker that dies ends the engine with
a clear error, never a hang."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cluster import LLM, SamplingParams
from replicas.parallel.runner import TensorParallelError
from tests.engine_support import CHATS, chat_token_ids, embedded_tokenizer, make_tiny_model
from tests.tp_support import mixed_prompts, ray_for_module
from tests.tiny_model import TINY_ENGINE, tiny_config

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
DEADLINE_S = 120


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield from ray_for_module("tp")


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def assert_same_tokens(one: LLM, two: LLM, prompts: list, params: SamplingParams = GREEDY) -> None:
    expected = one.generate(prompts, params, use_tqdm=False)
    got = two.generate(prompts, params, use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].text == e.outputs[0].text


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {"tie_word_embeddings": False, "vocab_size": 49155}),  # an odd vocabulary: padded shards
    ("qwen2", {"tie_word_embeddings": False, "seed": 2}),  # q/k/v biases
])
def test_random_models_tp2_match_tp1(tmp_path, tok, model_type, overrides):
    make_tiny_model(tmp_path, model_type, tok, **overrides)
    # 16-token chunks: every prompt is prefilled over several steps.
    opts = dict(num_gpu_blocks_override=64, max_num_batched_tokens=16, num_threads=1)
    one = LLM(model=str(tmp_path), **opts)
    two = LLM(model=str(tmp_path), tensor_parallel_size=2, **opts)
    ids = [5, 900, one.engine.model_config.vocab_size - 1]  # the last id: in the last rank's rows
    assert torch.equal(two.get_input_embeddings(ids), one.get_input_embeddings(ids))
    prompts = mixed_prompts(one, tok)
    assert_same_tokens(one, two, prompts)
    assert_same_tokens(one, two, prompts)  # again: prefix-cache hits
    # more than the 64 KV blocks hold: preempted sequences recompute into new block-table rows
    crowd = [{"prompt_token_ids": chat_token_ids(tok, c)} for c in CHATS] * 3
    before = two.engine.scheduler.num_preemptions
    assert_same_tokens(one, two, crowd, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert two.engine.scheduler.num_preemptions > before
    # logprobs and prompt logprobs: the LM head's gather also for scored prompt rows
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1)
    a, b = (llm.generate(prompts[1], params, use_tqdm=False)[0] for llm in (one, two))
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    for x, y in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_embedded_default_tp2_matches_tp1(embedded_llm, tok):
    two = LLM(model=None, tensor_parallel_size=2, num_threads=1)
    shard = two.engine.runner.model.layers[0].self_attn
    assert (shard.num_heads, shard.num_kv_heads) == (6, 2)  # 9 heads over 3 KV heads: 2 groups here, 1 there
    assert_same_tokens(embedded_llm, two, mixed_prompts(embedded_llm, tok), SamplingParams(max_tokens=12, temperature=0.0))


def test_fewer_kv_heads_than_ranks(tmp_path, tok):
    """4 ranks, 2 KV heads: two ranks hold each KV head and split its query heads."""
    model = tiny_config(tmp_path)
    one = LLM(model=model, **TINY_ENGINE)
    four = LLM(model=model, tensor_parallel_size=4, **TINY_ENGINE)
    assert four.engine.runner.model.layers[0].self_attn.num_kv_heads == 1
    ids = chat_token_ids(tok, CHATS[0])
    assert_same_tokens(one, four, [{"prompt_token_ids": ids}, {"prompt_embeds": one.get_input_embeddings(ids)}],
                       SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


def test_worker_death_fails_the_engine_cleanly(tmp_path):
    llm = LLM(model=tiny_config(tmp_path), tensor_parallel_size=2, **TINY_ENGINE)
    worker = llm.engine.runner.workers[0]
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    pool = ThreadPoolExecutor(1)
    running = pool.submit(llm.generate, ["Tell me a long story"] * 4, params, use_tqdm=False)
    while not llm.engine.scheduler.running:  # generating
        assert not running.done(), running.result()
        time.sleep(0.05)
    import ray

    threading.Timer(0.5, ray.kill, args=(worker,)).start()
    with pytest.raises(TensorParallelError, match="rank 1 died"):
        running.result(timeout=DEADLINE_S)
    pool.shutdown()
    with pytest.raises(TensorParallelError, match="rank 1 died"):
        llm.engine.runner.check_health()
    started = time.monotonic()
    with pytest.raises(TensorParallelError):  # and every later call, at once
        llm.generate("Anyone there?", SamplingParams(max_tokens=2), use_tqdm=False)
    assert time.monotonic() - started < 5


def test_worker_death_while_idle_is_noticed(tmp_path):
    import ray

    llm = LLM(model=tiny_config(tmp_path), tensor_parallel_size=2, **TINY_ENGINE)
    assert len(llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    ray.kill(llm.engine.runner.workers[0])
    deadline = time.monotonic() + DEADLINE_S
    while True:  # the monitor learns it without any step running (a Serve health check then fails)
        try:
            llm.engine.runner.check_health()
        except TensorParallelError as e:
            assert "rank 1 died" in str(e)
            break
        assert time.monotonic() < deadline, "the dead worker went unnoticed"
        time.sleep(0.1)


def test_sizes_the_model_cannot_take_are_refused_before_starting_workers(tmp_path):
    import ray

    groups = len(ray.util.placement_group_table())  # every group made, removed ones too
    with pytest.raises(ValueError, match="attention heads"):
        LLM(model=tiny_config(tmp_path), tensor_parallel_size=8, **TINY_ENGINE)  # 4 heads
    assert len(ray.util.placement_group_table()) == groups
