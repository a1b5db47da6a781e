"""The `raylm` command: serve the HTTP app on Ray, generate offline, or show Serve status.

    raylm serve [--config FILE] [--model M] [--num-replicas N] [--num-routers N] [--port P] [--host H]
                [--direct-port P]
                [--address ADDR] [--api-key K] [--engine KEY=VALUE ...]
                [--stream-messages-per-s N] [--stream-interval-ms MS] [--stream-max-interval-ms MS]
    raylm generate (--prompt TEXT | --embeds FILE.pt)... [--max-tokens N] [--temperature T]
    raylm status [--address ADDR]

`python -m cluster.cli ...` works the same. Heavy imports (ray, torch) happen inside commands.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

import yaml

DEFAULT_APP = "cluster.app:build_app"


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)  # numbers, booleans, null as YAML reads them


def _replica_count(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--num-replicas must be >= 1 or 'auto'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="LLM completions from a Ray cluster.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP app on Ray Serve")
    serve.add_argument("--config", help="a Ray Serve config file (its applications are deployed)")
    serve.add_argument("--model", help="model path or hub id (default: the embedded SmolLM2-135M)")
    serve.add_argument("--num-replicas", type=_replica_count, help="engine replicas, or 'auto'")
    serve.add_argument("--num-cpus", type=float, help="CPUs per replica")
    serve.add_argument("--num-gpus", type=float, help="GPUs per replica")
    serve.add_argument("--engine", type=_engine_option, action="append", default=[],
                       metavar="KEY=VALUE", help="an engine option, e.g. max_model_len=2048")
    serve.add_argument("--num-routers", type=int,
                       help="Router replicas (default 1; one carries the HTTP streams of about one GPU replica, "
                            "and /metrics sums all of their counts)")
    serve.add_argument("--direct-port", type=int,
                       help="the Routers also answer HTTP on this port of their nodes, skipping Serve's proxy "
                            "(all Routers of a node share it: the kernel spreads connections over them)")
    serve.add_argument("--api-key", help="require this bearer token")
    serve.add_argument("--stream-messages-per-s", type=float,
                       help="per replica, the stream messages a second it aims at while many streams are open "
                            "(default 500; more streams: several steps per message)")
    serve.add_argument("--stream-max-interval-ms", type=float,
                       help="most time between two messages of one stream (default 500)")
    serve.add_argument("--stream-interval-ms", type=float,
                       help="least time between two messages of one stream (default 0: every engine step)")
    serve.add_argument("--route-prefix", help="HTTP route prefix (default /)")
    serve.add_argument("--name", help="Serve application name (default raylm)")
    serve.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--address", help="an existing Ray cluster; default: start a local one")
    serve.add_argument("--object-store-mb", type=int, default=512,
                       help="object store size of the local Ray started (default 512)")

    gen = commands.add_parser("generate", help="run prompts offline in this process")
    gen.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    gen.add_argument("--embeds", action="append", default=[], metavar="FILE.pt",
                     help="a torch.save'd (seq_len, hidden_size) tensor (repeatable)")
    gen.add_argument("--model", help="model path or hub id (default: the embedded SmolLM2-135M)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--engine", type=_engine_option, action="append", default=[],
                     metavar="KEY=VALUE", help="an LLM keyword argument, e.g. dtype=float32")

    status = commands.add_parser("status", help="print the Serve applications' status")
    status.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    return parser


# ------------------------------------------------------------------------------------ serve

def build_app_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The `cluster.app:build_app` args the command line names (unset flags are left out)."""
    args: dict[str, Any] = {}
    for flag, key in (("model", "model"), ("num_replicas", "num_replicas"), ("num_routers", "num_routers"),
                      ("direct_port", "direct_port"), ("api_key", "api_key"), ("route_prefix", "route_prefix"),
                      ("name", "name")):
        if getattr(ns, flag) is not None:
            args[key] = getattr(ns, flag)
    if ns.engine:
        args["engine"] = dict(ns.engine)
    batching = {k: v for k, v in (("messages_per_s", ns.stream_messages_per_s),
                                  ("interval_ms", ns.stream_interval_ms),
                                  ("max_interval_ms", ns.stream_max_interval_ms)) if v is not None}
    if batching:
        args["stream_batching"] = batching
    actor_options = {k: v for k, v in (("num_cpus", ns.num_cpus), ("num_gpus", ns.num_gpus))
                     if v is not None}
    if actor_options:
        args["ray_actor_options"] = actor_options
    return args


def load_applications(ns: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """[{name, route_prefix, import_path, args}] and http_options, from --config and the flags."""
    overrides = build_app_args(ns)
    if not ns.config:
        return [{"import_path": DEFAULT_APP, "args": overrides}], {}
    with open(ns.config) as f:
        config = yaml.safe_load(f) or {}
    apps = []
    for app in config.get("applications") or []:
        args = dict(app.get("args") or {})
        for key, value in overrides.items():  # dict options (engine, ray_actor_options) merge
            args[key] = {**(args.get(key) or {}), **value} if isinstance(value, dict) else value
        for key in ("name", "route_prefix"):
            if key in app and key not in overrides:
                args[key] = app[key]
        apps.append({"import_path": app.get("import_path", DEFAULT_APP), "args": args})
    if not apps:
        raise SystemExit(f"{ns.config}: no applications to deploy")
    return apps, dict(config.get("http_options") or {})


def _import(path: str):
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def connect_ray(address: str) -> None:
    """Join an existing Ray cluster. A local cluster started by `ray.init` turns token auth on
    with ~/.ray/auth_token, but a driver given an explicit address presents the token only when
    RAY_AUTH_MODE says so; do what Ray does for `address="auto"`: use the token if one exists."""
    import ray

    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:  # a Ray without token auth
        pass
    ray.init(address=address, log_to_driver=False, logging_level="warning")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def cmd_serve(ns: argparse.Namespace) -> int:
    apps, http_options = load_applications(ns)
    host = ns.host or http_options.get("host", "127.0.0.1")
    port = ns.port or int(http_options.get("port", 8000))
    temp_dir = None
    import ray
    from ray import serve

    if ns.address:
        connect_ray(ns.address)
    else:
        temp_dir = tempfile.mkdtemp(prefix="raylm-")
        ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
                 object_store_memory=ns.object_store_mb << 20)
    deployed: list[str] = []
    try:
        serve.start(http_options={"host": host, "port": port})
        for app in apps:
            name = app["args"].pop("name", "raylm")
            prefix = app["args"].pop("route_prefix", "/")
            direct = app["args"].get("direct_port")
            if direct:
                app["args"].setdefault("direct_host", host)
            target = _import(app["import_path"])
            application = target(app["args"]) if callable(target) else target
            serve.run(application, name=name, route_prefix=prefix, blocking=False)
            deployed.append(name)
            print(f"raylm: {name} serving at http://{host}:{port}{prefix.rstrip('/')}/v1", flush=True)
            if direct:
                print(f"raylm: {name}'s Routers also at http://{host}:{direct}/v1 (no proxy hop)", flush=True)
        print(f"raylm: Ray at {ray.get_runtime_context().gcs_address}"
              f"{f', logs in {temp_dir}' if temp_dir else ''}; Ctrl-C to stop", flush=True)
        _wait_for_signal()
        print("raylm: shutting down", flush=True)
        return 0
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        logs = f" (Ray logs kept in {temp_dir})" if temp_dir else ""
        print(f"raylm: serve failed: {type(exc).__name__}: {exc}{logs}", file=sys.stderr)
        temp_dir = None
        return 1
    finally:
        if ns.address:
            for name in deployed:
                serve.delete(name)
        else:
            serve.shutdown()
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ generate

def load_embeds_file(path: str):
    import torch

    tensor = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise SystemExit(f"{path}: expected a torch.save'd tensor, got {type(tensor).__name__}")
    return tensor


def cmd_generate(ns: argparse.Namespace) -> int:
    if not ns.prompt and not ns.embeds:
        raise SystemExit("raylm generate: give at least one --prompt or --embeds")
    from cluster import LLM, SamplingParams

    prompts = [{"prompt_embeds": load_embeds_file(p)} for p in ns.embeds] + list(ns.prompt)
    labels = [f"embeds {p}" for p in ns.embeds] + [f"prompt {p!r}" for p in ns.prompt]
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=ns.seed)
    llm = LLM(model=ns.model, enable_prompt_embeds=True, **dict(ns.engine))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for label, out in zip(labels, outputs):
        if len(outputs) > 1:
            print(f"--- {label}")
        print(out.outputs[0].text)
    return 0


# ------------------------------------------------------------------------------------ status

def _enum(value) -> str:
    return str(getattr(value, "value", value))


def cmd_status(ns: argparse.Namespace) -> int:
    try:
        connect_ray(ns.address)
    except (ConnectionError, RuntimeError) as exc:
        print(f"raylm: no Ray cluster at {ns.address}: {exc}", file=sys.stderr)
        return 1
    import ray
    from ray import serve

    try:
        apps = serve.status().applications
        if not apps:
            print("no Serve applications")
        for name, app in apps.items():
            print(f"{name}: {_enum(app.status)}{f' ({app.message})' if app.message else ''}")
            for dep_name, dep in app.deployments.items():
                replicas = ", ".join(f"{n} {_enum(s)}" for s, n in dep.replica_states.items())
                print(f"  {dep_name}: {_enum(dep.status)} [{replicas}]")
        return 0
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return {"serve": cmd_serve, "generate": cmd_generate, "status": cmd_status}[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
