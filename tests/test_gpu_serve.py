"""A Serve replica on a real GPU: the engine picks CUDA, text and embeds requests complete over HTTP."""
from __future__ import annotations

import os

import pytest
import requests

from serve_utils import b64_embeds, free_port, start_ray, start_serve, stop_all, wait_healthy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_app():
    from ray import serve

    from cluster.app import run
    from replicas.loader import embedded_model_dir

    tmp = start_ray("gpu", num_cpus=4, object_store_mb=500)
    try:
        port = free_port()
        start_serve(port)
        tokenizer = os.environ.get("RAYLM_TOKENIZER_DIR") or embedded_model_dir()
        run({"name": "raylm", "model": "llama-3.2-1b", "num_replicas": 1,
             "engine": {"load_format": "dummy", "tokenizer": tokenizer, "max_model_len": 2048},
             "ray_actor_options": {"num_gpus": 1, "num_cpus": 1}})
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield base, serve.get_deployment_handle("Replica", app_name="raylm")
    finally:
        stop_all(tmp)


def test_replica_runs_on_cuda_in_bfloat16(gpu_app):
    _, handle = gpu_app
    info = handle.model_info.remote().result(timeout_s=60)
    assert info.device.startswith("cuda") and info.dtype == "torch.bfloat16"


def test_text_and_embeds_complete_over_http(gpu_app):
    import torch

    base, _ = gpu_app
    text = requests.post(f"{base}/v1/completions", json={
        "model": "llama-3.2-1b", "prompt": "Hello", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True})
    assert text.status_code == 200, text.text
    assert text.json()["usage"]["completion_tokens"] == 8
    embeds = torch.randn(12, 2048, dtype=torch.bfloat16) * 0.02
    both = requests.post(f"{base}/v1/completions", json={
        "model": "llama-3.2-1b", "prompt": "", "prompt_embeds": b64_embeds(embeds), "max_tokens": 8,
        "temperature": 0.0, "ignore_eos": True})
    assert both.status_code == 200, both.text
    body = both.json()
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 8
