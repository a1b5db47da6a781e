"""Several nodes on one machine: a head and two nodes that declare one (fake) GPU each.

One replica per GPU node (tiny random-weight model), requests over HTTP reach both, and the
service keeps answering when one node is removed.
"""
from __future__ import annotations

import json
import re
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from fake_cluster import fake_gpu_cluster
from serve_utils import wait_healthy

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster.app import run

    config = tmp_path_factory.mktemp("tiny") / "tiny-llama.json"
    config.write_text(json.dumps(TINY))
    with fake_gpu_cluster("multi", [{"num_cpus": 1, "num_gpus": 1}] * 2) as fake:
        run({"name": "raylm", "model": str(config),
             "engine": {"load_format": "dummy", "max_model_len": 1024, "kv_cache_memory_gb": 0.02,
                        "num_threads": 1},
             "num_replicas": 2, "routing_stats_period_s": 0.5, "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.5},
             "router_actor_options": {"resources": {"head": 0.01}}})
        wait_healthy(fake.base)
        yield SimpleNamespace(cluster=fake.cluster, gpu_nodes=fake.nodes, base=fake.base)


def complete(base: str, prompt: str, max_tokens: int = 4, timeout_s: float = 300) -> requests.Response:
    return requests.post(f"{base}/v1/completions", timeout=timeout_s,
                         json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})


def concurrently(base: str, prompts: list[str], max_tokens: int = 4) -> tuple[list, list[threading.Thread]]:
    """Start one request per prompt in threads; join the threads, then read the results."""
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = complete(base, prompts[i], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return results, threads


def joined(started: tuple[list, list[threading.Thread]]) -> list[requests.Response]:
    results, threads = started
    for t in threads:
        t.join()
    return results


def metric(base: str, name: str) -> dict[str, float]:
    """A metric's values by replica label ("" when it has none)."""
    text = requests.get(f"{base}/metrics", timeout=30).text
    pattern = rf'^{name}(?:\{{replica="([^"]+)"\}})? ([0-9.e+]+)$'
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def wait_for(check, timeout_s: float = 60, what: str = ""):
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_one_replica_on_each_gpu_node(cluster):
    import ray
    from ray import serve

    assert ray.cluster_resources()["GPU"] == 2
    assert ray.available_resources().get("GPU", 0) == 0  # each node's only GPU holds a replica
    status = serve.status().applications["raylm"].deployments["Replica"]
    assert status.replica_states.get("RUNNING") == 2


def test_requests_are_served_by_both_replicas(cluster):
    responses = joined(concurrently(cluster.base, [f"Prompt number {i} about something" for i in range(16)]))
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses)
    # per-replica counts arrive with Serve's next routing-stats poll
    counts = wait_for(lambda: (c := metric(cluster.base, "raylm_replica_requests_total")) and len(c) == 2
                      and sum(c.values()) >= 16 and c, what="both replicas to report the requests")
    assert all(v >= 1 for v in counts.values()), counts


def settled_counts(base: str, deadline_s: float = 60.0) -> dict[str, float]:
    """Per-replica request counts once two reads a second apart agree (stats lag their polls)."""
    last = None
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        now = metric(base, "raylm_replica_requests_total")
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    raise AssertionError(f"replica request counts did not settle within {deadline_s:.0f} s: {last}")


def test_shared_prefix_prefers_the_replica_that_served_it(cluster):
    before = settled_counts(cluster.base)
    prefix = "You are a careful assistant who answers in one short sentence. " * 6
    for i in range(6):  # one after another: the replicas stay balanced (idle)
        assert complete(cluster.base, prefix + f"Question {i}: what is {i} plus {i}?").status_code == 200
    after = wait_for(lambda: (c := settled_counts(cluster.base)) and sum(c.values()) - sum(before.values()) >= 6
                     and c, what="the counts of the six requests")
    deltas = sorted(after[r] - before.get(r, 0) for r in after)
    assert deltas == [0, 6], (before, after)


def test_service_survives_losing_a_node_mid_request(cluster):
    """Requests running on the lost node are sent again to the other replica and complete."""
    started = concurrently(cluster.base, [f"Long request {i}" for i in range(8)], max_tokens=800)
    wait_for(lambda: (r := metric(cluster.base, "raylm_replica_running_requests")) and len(r) == 2
             and all(v >= 1 for v in r.values()), what="both replicas to be running requests")
    cluster.cluster.remove_node(cluster.gpu_nodes[1], allow_graceful=False)  # the other keeps serving
    responses = joined(started)
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 800 for r in responses)
    assert metric(cluster.base, "raylm_request_retries_total")[""] >= 1
    wait_for(lambda: (h := requests.get(f"{cluster.base}/health", timeout=30)).status_code == 200
             and h.json()["live_replicas"] == 1, what="the router to drop the lost replica")
    assert complete(cluster.base, "One more").status_code == 200


def test_no_live_replica_is_503(cluster):
    for node in cluster.gpu_nodes:  # whichever GPU nodes are still up
        if node in cluster.cluster.worker_nodes:
            cluster.cluster.remove_node(node, allow_graceful=False)
    # (a requests.Response is falsy for 4xx/5xx: wrap it to return it from wait_for)
    r = wait_for(lambda: (x := complete(cluster.base, "Anyone there?", timeout_s=120)).status_code == 503 and [x],
                 what="a 503 once no replica is left")[0]
    err = r.json()["error"]
    assert err["code"] == "no_live_replica" and set(err) == {"message", "type", "param", "code"}
    assert int(r.headers["Retry-After"]) >= 1
    assert requests.get(f"{cluster.base}/health", timeout=30).status_code == 503
