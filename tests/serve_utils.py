"""Helpers the Serve tests share: a private Ray cluster per test module, Serve on a free port."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def code_on_path() -> None:
    """Make the repository importable here and in the Ray workers this driver starts."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + parts)


def temp_dir(tag: str) -> str:
    # Short: Ray puts unix sockets under it (108-byte path limit).
    return tempfile.mkdtemp(prefix=f"raylm-{tag}-", dir="/tmp")


def start_ray(tag: str, num_cpus: int = 2, object_store_mb: int = 200) -> str:
    import ray

    code_on_path()
    tmp = temp_dir(tag)
    ray.init(_temp_dir=tmp, include_dashboard=False, num_cpus=num_cpus,
             object_store_memory=object_store_mb * 1024 * 1024, log_to_driver=False)
    return tmp


def start_serve(port: int) -> None:
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")


def stop_all(tmp: str | None) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def wait_healthy(base_url: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            r = requests.get(f"{base_url}/health", timeout=10)
            if r.status_code == 200:
                return
            last = r.text
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not healthy after {timeout_s}s: {last}")


@contextlib.contextmanager
def serving(tag: str, app_args: dict, num_cpus: int = 2, object_store_mb: int = 200, timeout_s: float = 180):
    """A private Ray cluster with Serve on a free port running `cluster.app.run(app_args)`, torn
    down when the block ends; yields the base URL once /health answers."""
    tmp = start_ray(tag, num_cpus=num_cpus, object_store_mb=object_store_mb)
    try:
        from cluster.app import run

        port = free_port()
        start_serve(port)
        run(app_args)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout_s)
        yield base
    finally:
        stop_all(tmp)


@contextlib.contextmanager
def serving_replicas(tag: str, app_args: dict, timeout_s: float = 180):
    """serving() once all `num_replicas` replicas are live; yields the base URL, a `connect()`
    client, the Replica deployment's handle and the served model's id."""
    from types import SimpleNamespace

    with serving(tag, app_args, timeout_s=timeout_s) as base:
        from ray import serve

        from cluster.client import connect

        client = connect()
        n = app_args["num_replicas"]
        wait_for(lambda: len(live_replicas(client)) == n, f"{n} live replicas", timeout_s)
        model = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        yield SimpleNamespace(base=base, client=client, handle=serve.get_deployment_handle("Replica", "raylm"),
                              model=model)


def b64_embeds(tensor) -> str:
    """What vLLM's docs send: base64 of torch.save bytes."""
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def sse_events(response: requests.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]


def wait_for(check, what: str, timeout_s: float = 120):
    """check()'s first truthy value, polled; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def within(fn, timeout_s: float = 120):
    """fn() in a thread, or TimeoutError after timeout_s (for blocking iterators)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)  # a hung call must not hold the test past its deadline


def live_replicas(client, timeout_s: float = 120) -> list[str]:
    """Replica ids a `cluster.connect()` client's router may send to (it learns changes from Serve)."""
    from router.routing import request_router_of

    client.handle.get_load.remote().result(timeout_s=timeout_s)  # makes sure the router exists
    return request_router_of(client.handle).live_replica_ids()


def retries(base: str) -> float:
    """The router's count of prompts sent again after their replica was lost (its /metrics)."""
    import re

    text = requests.get(f"{base}/metrics", timeout=30).text
    m = re.search(r"^raylm_request_retries_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
