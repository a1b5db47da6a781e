"""Tensor-parallel replicas on several nodes of one machine (a head, one node with 2 fake GPUs, two
with 1): a TP=2 replica's bundles stay on one node (STRICT_PACK, the default); one that no node can
hold whole waits rather than splitting; one asked to span nodes (PACK) runs over two, its ranks
talking over gloo. The replicas compute on the CPU (the GPUs are only declared)."""
from __future__ import annotations

import time

import pytest
import ray
import requests

from fake_cluster import fake_gpu_cluster
from serve_utils import wait_healthy
from tiny_model import TINY_ENGINE, tiny_config

DEADLINE_S = 180


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    nodes = [{"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1}]
    with fake_gpu_cluster("tpmulti", nodes) as cluster:
        cluster.model = tiny_config(tmp_path_factory.mktemp("tiny"))
        yield cluster


def app(model: str, name: str, strategy: str) -> dict:
    return {"name": name, "route_prefix": f"/{name}", "model": model,
            "engine": {**TINY_ENGINE, "tensor_parallel_size": 2, "placement_group_strategy": strategy},
            "num_replicas": 1, "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.25}, "router_num_cpus": 0.1,
            "router_actor_options": {"resources": {"head": 0.01}}}


def tp_workers() -> dict[str, str]:
    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("raylm-tp-")}


def deploy(fake, name: str, strategy: str) -> tuple[str, str]:
    """Run the app; (rank 0's node, rank 1's node) of its replica, once it answers over HTTP."""
    from ray import serve

    from cluster.app import run

    before = tp_workers()
    run(app(fake.model, name, strategy))
    wait_healthy(f"{fake.base}/{name}", DEADLINE_S)
    r = requests.post(f"{fake.base}/{name}/v1/completions", timeout=DEADLINE_S,
                      json={"prompt": "Hello there", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    (worker, namespace), = [(n, ns) for n, ns in tp_workers().items() if n not in before]
    info = serve.get_deployment_handle("Replica", name).model_info.remote().result(timeout_s=DEADLINE_S)
    return info.node_id, ray.get(ray.get_actor(worker, namespace=namespace).node_id.remote(), timeout=DEADLINE_S)


def test_strict_pack_keeps_the_ranks_on_one_node(fake):
    two_gpu_node = fake.nodes[0].node_id
    assert deploy(fake, "packed", "STRICT_PACK") == (two_gpu_node, two_gpu_node)


def test_a_replica_no_node_can_hold_waits_rather_than_splitting(fake):
    from ray import serve
    from ray.serve.api import RunTarget

    from cluster.app import build_app

    # The 2-GPU node is taken; the 1-GPU nodes could hold the two ranks only split.
    serve.run_many([RunTarget(build_app(app(fake.model, "waits", "STRICT_PACK")), name="waits",
                              route_prefix="/waits")], wait_for_applications_running=False)
    time.sleep(8)
    states = serve.status().applications["waits"].deployments["Replica"].replica_states
    assert not states.get("RUNNING"), states
    assert ray.available_resources().get("GPU", 0) == 2  # nothing reserved on either 1-GPU node
    serve.delete("waits")


def test_pack_spans_nodes_when_asked(fake):
    one_gpu_nodes = {fake.nodes[1].node_id, fake.nodes[2].node_id}
    rank0, rank1 = deploy(fake, "spans", "PACK")
    assert {rank0, rank1} == one_gpu_nodes
