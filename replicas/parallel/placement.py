"""Where a tensor-parallel group runs: a Ray placement group of one bundle per rank.

A Serve replica runs inside the group Serve made for it (the deployment's placement_group_bundles,
see serve_options): the replica holds bundle 0 and is rank 0. The offline `LLM` makes its own
group, bundle 0 pinned to this node for rank 0 (this process). Ranks 1..k-1 are actors in the
other bundles. STRICT_PACK (the default) keeps every bundle on one node.

GPU ranks see every GPU of their node (Ray's RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), each
using the one Ray gave it by index: NCCL can only use peer-to-peer copies (NVLink) between GPUs
a process sees; hidden from each other, the ranks would fall back to shared host memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
PLACEMENT_TIMEOUT_S = float(os.environ.get("RAYLM_PLACEMENT_TIMEOUT_S", 300))


@dataclass
class Placement:
    group: PlacementGroup
    bundles: list[dict[str, float]]
    owned: bool  # made here (offline): removed when the engine goes

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle,
                                                placement_group_capture_child_tasks=False)

    def release(self) -> None:
        if self.owned:
            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - Ray may already be shutting down
                pass


def rank_bundle(gpu: bool, actor_options: dict | None = None) -> dict[str, float]:
    """The resources of one rank: what a replica's ray_actor_options ask for, or one GPU (or CPU)."""
    if actor_options is None:
        return {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": 1.0}
    bundle = {"CPU": float(actor_options.get("num_cpus", 1))}
    if actor_options.get("num_gpus"):
        bundle["GPU"] = float(actor_options["num_gpus"])
    bundle.update({k: float(v) for k, v in (actor_options.get("resources") or {}).items()})
    return {k: v for k, v in bundle.items() if v}


def serve_options(engine: dict, actor_options: dict) -> dict:
    """Serve deployment options for replicas of `tensor_parallel_size` ranks: one bundle per rank
    (the replica's own resources for each), the strategy, and on GPUs every GPU of the node visible
    to the replica. Empty for one rank."""
    size = int(engine.get("tensor_parallel_size") or 1)
    if size <= 1:
        return {}
    bundle = rank_bundle(True, actor_options)
    options = {"placement_group_bundles": [dict(bundle) for _ in range(size)],
               "placement_group_strategy": engine.get("placement_group_strategy", "STRICT_PACK")}
    if bundle.get("GPU"):
        runtime_env = dict(actor_options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), NOSET_CUDA: "1"}
        options["ray_actor_options"] = {**actor_options, "runtime_env": runtime_env}
    return options


def acquire(size: int, gpu: bool, strategy: str) -> Placement:
    """The group this rank 0 runs in: its Serve replica's, or a new one of `size` bundles."""
    if not ray.is_initialized():
        ray.init()  # the offline LLM on a machine with no cluster running: a local one
    current = ray.util.get_current_placement_group()
    if current is not None:
        specs = current.bundle_specs
        if len(specs) != size:
            raise ValueError(f"tensor_parallel_size {size} but this replica's placement group has "
                             f"{len(specs)} bundles")
        return Placement(current, specs, owned=False)
    bundles = [rank_bundle(gpu) for _ in range(size)]
    bundles[0][f"node:{ray.util.get_node_ip_address()}"] = 0.001  # rank 0 is this process
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"tensor parallel: the cluster could not place {size} bundles of {bundles[1]} "
                           f"({strategy}, the first on this node) within {PLACEMENT_TIMEOUT_S:.0f} s; "
                           f"available: {ray.available_resources()}") from None
    return Placement(group, bundles, owned=True)


def cuda_index(gpu_id) -> int:
    """The CUDA ordinal of a GPU Ray assigned (by id) in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return int(gpu_id)
    ids = [x.strip() for x in visible.split(",")]
    if str(gpu_id) not in ids:
        raise RuntimeError(f"GPU {gpu_id} (Ray's) is not among this process's CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(str(gpu_id))


@ray.remote(num_cpus=0)
def _gpu_ids() -> list:
    return ray.get_gpu_ids()


def rank_device(device: torch.device, placement: Placement | None = None) -> torch.device:
    """A rank's device: the CPU, or the GPU Ray gave its bundle (an actor's own; for the offline
    driver, the one bundle 0 holds on this node)."""
    if device.type != "cuda" or device.index is not None:
        return device
    ids = ray.get_gpu_ids()
    if not ids and placement is not None:
        gpus = placement.bundles[0].get("GPU", 0)
        ids = ray.get(_gpu_ids.options(num_gpus=gpus, scheduling_strategy=placement.strategy(0)).remote())
    if not ids:
        raise RuntimeError("tensor parallel on CUDA: Ray gave rank 0's bundle no GPU")
    return torch.device("cuda", cuda_index(ids[0]))


def worker_options(placement: Placement, bundle: int) -> dict:
    spec = placement.bundles[bundle]
    options = {"num_cpus": spec.get("CPU", 0), "num_gpus": spec.get("GPU", 0),
               "resources": {k: v for k, v in spec.items() if k not in ("CPU", "GPU", "memory")
                             and not k.startswith("node:") and "_group_" not in k},
               "scheduling_strategy": placement.strategy(bundle), "max_restarts": 0}
    if spec.get("GPU"):
        options["runtime_env"] = {"env_vars": {NOSET_CUDA: "1"}}
    return options
