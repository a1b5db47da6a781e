"""The Serve application: `build_app(args)` is the import path of every config file.

Two deployments: `Router` (FastAPI ingress, HTTP) holding a handle to `Replica` (one engine each).

Why one `Replica` deployment with a custom request router, not one deployment per replica: Ray
2.60 lets a deployment name a `RequestRouter` class that runs inside every handle. Ours
(router.routing.PrefixAffinityRouter) sees each request's arguments, so it can prefer the replica
that served a prompt's prefix and otherwise pick the least loaded one, while Serve keeps doing
what it does well: replica count and autoscaling, `max_replicas_per_node` placement, restarts
of unhealthy replicas, health checks, per-replica `max_ongoing_requests` and the handle's
`max_queued_requests` (our 429). Python clients (`cluster.connect()`) get the same routing
through their own handles. One deployment per replica would have to redo all of that by hand.

args (all optional):
  model               model path / hub id; None: the embedded default (SmolLM2-135M-Instruct)
  engine              dict of LLM keyword arguments (max_model_len, load_format, dtype, ...)
  num_replicas        int, "auto" (Serve autoscaling) or "per_gpu" (the cluster's GPUs divided by
                      the GPUs each replica asks for, counted when the app is built; default per_gpu
                      when replicas ask for GPUs, else 1)
  ray_actor_options   per replica, e.g. {"num_gpus": 1}; default {"num_gpus": 1, "num_cpus": 1} on a
                      cluster with GPUs (one replica per GPU, the CUDA engine), else {"num_cpus": 0.5}
  max_replicas_per_node  spread replicas across nodes
  max_ongoing_requests   per replica (default 256), then requests queue in the router
  max_queued_requests    per router, beyond which requests get 429 (default 512)
  imbalance_threshold    how many more in-flight requests prefix affinity may tolerate (default 4)
  routing_stats_period_s how often Serve polls each replica's load for routing and /metrics (2)
  stream_batching     how often a stream sends a message: {interval_ms, messages_per_s, max_interval_ms}
                      (replicas.deployment.StreamBatching: at most once per engine step, and while many
                      streams are open, about messages_per_s messages per second per replica in all)
  api_key, served_model_name, max_body_mb, max_embeds_mb   HTTP options
  router_num_cpus     the Router's CPU share (default 0.25)
  router_actor_options  Ray actor options of the Router (e.g. {"resources": {"head": 0.01}})
  num_routers         Router replicas (default 1; the HTTP proxy balances across them)
  direct_port, direct_host  the Routers also answer HTTP on this port of their nodes (all Routers of a
                      node share it, SO_REUSEPORT), skipping Serve's proxy: router.direct_http
  route_prefix, name  used by `run()` (config files set them at the application level)
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.client import DEFAULT_APP_NAME
from replicas.deployment import Replica, StreamBatching
from replicas.parallel.placement import serve_options as tensor_parallel_options
from router.app import Router
from router.routing import PrefixAffinityRouter

DEFAULT_ROUTE_PREFIX = "/"

_KNOWN = {"model", "engine", "num_replicas", "ray_actor_options", "max_replicas_per_node",
          "max_ongoing_requests", "max_queued_requests", "imbalance_threshold", "api_key",
          "served_model_name", "max_body_mb", "max_embeds_mb", "router_num_cpus", "route_prefix",
          "name", "health_check_period_s", "router_actor_options", "num_routers", "routing_stats_period_s",
          "stream_batching", "direct_port", "direct_host"}


def _default_actor_options() -> dict:
    """One GPU per replica where the cluster has GPUs (then one replica per GPU), else half a CPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 0.5}


def _num_replicas(value: Any, actor_options: dict, ranks: int = 1) -> Any:
    if value != "per_gpu":
        return value
    import ray

    per_replica = float(actor_options.get("num_gpus") or 0) * ranks  # tensor parallel: a GPU per rank
    if per_replica <= 0:
        raise ValueError("num_replicas: per_gpu needs ray_actor_options.num_gpus > 0")
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if gpus < per_replica:
        raise ValueError(f"num_replicas: per_gpu found {gpus} GPUs in the cluster, fewer than one replica needs")
    return int(gpus // per_replica)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    args = dict(args or {})
    unknown = sorted(set(args) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown raylm app arguments: {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")

    actor_options = dict(args.get("ray_actor_options") or _default_actor_options())
    engine = dict(args.get("engine") or {})
    ranks = int(engine.get("tensor_parallel_size") or 1)
    replica_options: dict[str, Any] = dict(
        name="Replica",
        num_replicas=_num_replicas(args.get("num_replicas", "per_gpu" if actor_options.get("num_gpus") else 1),
                                   actor_options, ranks),
        ray_actor_options=actor_options,
        max_ongoing_requests=int(args.get("max_ongoing_requests", 256)),
        max_queued_requests=int(args.get("max_queued_requests", 512)),
        health_check_period_s=float(args.get("health_check_period_s", 5)),
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
        # Its callers are the Routers' handle calls (requests, loads, aborts): an access-log line
        # each costs the replica's event loop more than it tells anyone; the Routers log HTTP.
        logging_config={"enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance_threshold": float(args.get("imbalance_threshold", 4))},
            request_routing_stats_period_s=float(args.get("routing_stats_period_s", 2)),
            request_routing_stats_timeout_s=10,
        ),
    )
    # Tensor parallel: each replica a placement group of one bundle per rank (it holds the first).
    replica_options.update(tensor_parallel_options(engine, actor_options))
    if args.get("max_replicas_per_node") is not None:
        replica_options["max_replicas_per_node"] = int(args["max_replicas_per_node"])
    batching = dict(args.get("stream_batching") or {})
    try:
        StreamBatching(**batching)  # refuse unknown keys here, not in every replica
    except TypeError as e:
        raise ValueError(f"stream_batching: {e}") from None
    replicas = serve.deployment(Replica).options(**replica_options).bind(
        args.get("model"), dict(args.get("engine") or {}), batching)

    mb = 1024 * 1024
    router_actor_options = {"num_cpus": float(args.get("router_num_cpus", 0.25))}
    router_actor_options.update(args.get("router_actor_options") or {})
    router = serve.deployment(Router).options(
        name="Router",
        num_replicas=int(args.get("num_routers", 1)),
        ray_actor_options=router_actor_options,
        max_ongoing_requests=4096,
    )
    return router.bind(
        replicas,
        api_key=args.get("api_key"),
        served_model_name=args.get("served_model_name"),
        max_body_bytes=int(float(args.get("max_body_mb", 256)) * mb),
        max_embeds_bytes=int(float(args["max_embeds_mb"]) * mb) if args.get("max_embeds_mb") else None,
        direct_port=int(args["direct_port"]) if args.get("direct_port") else None,
        direct_host=args.get("direct_host", "0.0.0.0"),
    )


def run(args: dict[str, Any] | None = None, *, blocking: bool = False) -> serve.handle.DeploymentHandle:
    """`serve.run` the application with its `name` and `route_prefix` args."""
    args = dict(args or {})
    return serve.run(build_app(args), name=args.get("name", DEFAULT_APP_NAME),
                     route_prefix=args.get("route_prefix", DEFAULT_ROUTE_PREFIX), blocking=blocking)
