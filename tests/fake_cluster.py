"""Several Ray nodes on one machine: a head (2 CPUs, resource `head` for the routers) and nodes that
declare fake GPUs, with Ray and Serve started on them; torn down by what was started here."""
from __future__ import annotations

import contextlib
import os
import shutil
from types import SimpleNamespace

from serve_utils import code_on_path, free_port, start_serve, temp_dir

MB = 1024 * 1024


@contextlib.contextmanager
def fake_gpu_cluster(tag: str, nodes: list[dict]):
    """nodes: add_node arguments of each worker node (e.g. {"num_cpus": 1, "num_gpus": 2}).
    Yields (cluster, its worker nodes, the HTTP base url)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    code_on_path()
    tmp = temp_dir(tag)
    # Cluster() records its address in $RAY_TMPDIR/ray/ray_current_cluster: keep that file (which
    # `ray.init("auto")` reads) inside our own directory, away from other Ray users of this machine.
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    c = Cluster(initialize_head=True, head_node_args={
        "gcs_server_port": free_port(), "num_cpus": 2, "resources": {"head": 1}, "object_store_memory": 100 * MB,
        "temp_dir": tmp, "include_dashboard": False})
    workers = [c.add_node(object_store_memory=80 * MB, temp_dir=tmp, **node) for node in nodes]
    try:
        ray.init(address=c.address, log_to_driver=False)
        port = free_port()
        start_serve(port)
        yield SimpleNamespace(cluster=c, nodes=workers, base=f"http://127.0.0.1:{port}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()
            if old_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = old_tmpdir
            shutil.rmtree(tmp, ignore_errors=True)
