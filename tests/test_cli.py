"""cluster/cli.py: the `raylm` command's parsing, and its serve/status/generate paths end to end."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from cluster.cli import build_app_args, build_parser, load_applications, main

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command, words", [
    ("serve", ["--config", "--model", "--num-replicas", "--port", "--address", "--api-key", "--host"]),
    ("generate", ["--prompt", "--embeds", "--max-tokens", "--temperature", "--model"]),
    ("status", ["--address"]),
])
def test_help_of_each_subcommand(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raylm {command}")
    for word in words:
        assert word in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("serve", "generate", "status"))


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: raylm status" in proc.stdout


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_serve_flags_become_build_app_args():
    ns = parse("serve", "--model", "/models/llama", "--num-replicas", "3", "--api-key", "sk-x",
               "--num-cpus", "0.5", "--num-gpus", "1", "--engine", "max_model_len=2048",
               "--engine", "load-format=dummy", "--engine", "enable_prefix_caching=false",
               "--route-prefix", "/llm", "--name", "demo")
    assert build_app_args(ns) == {
        "model": "/models/llama", "num_replicas": 3, "api_key": "sk-x",
        "route_prefix": "/llm", "name": "demo",
        "engine": {"max_model_len": 2048, "load_format": "dummy", "enable_prefix_caching": False},
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1.0},
    }


def test_stream_batching_flags_become_the_stream_batching_arg():
    from cluster.app import build_app

    args = build_app_args(parse("serve", "--stream-messages-per-s", "500", "--stream-interval-ms", "20"))
    assert args == {"stream_batching": {"messages_per_s": 500.0, "interval_ms": 20.0}}
    assert type(build_app(args)).__name__ == "Application"
    with pytest.raises(ValueError, match="stream_batching"):
        build_app({"stream_batching": {"every_ms": 5}})


def test_direct_port_flag_becomes_the_direct_port_arg():
    from cluster.app import build_app

    args = build_app_args(parse("serve", "--num-routers", "4", "--direct-port", "8100"))
    assert args == {"num_routers": 4, "direct_port": 8100}
    assert type(build_app(args)).__name__ == "Application"
    with pytest.raises(SystemExit):
        parse("serve", "--direct-port", "http")


def test_unset_serve_flags_leave_build_app_defaults():
    ns = parse("serve")
    assert build_app_args(ns) == {}
    assert ns.port is None and ns.host is None and ns.address is None
    assert parse("serve", "--num-replicas", "auto").num_replicas == "auto"


@pytest.mark.parametrize("argv", [
    ["serve", "--num-replicas", "0"],
    ["serve", "--num-replicas", "two"],
    ["serve", "--engine", "no-equals-sign"],
    ["serve", "--port", "http"],
    ["generate", "--max-tokens", "many"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2


def test_built_args_are_accepted_by_build_app():
    from cluster.app import build_app

    args = build_app_args(parse("serve", "--num-replicas", "2", "--num-cpus", "0.25",
                                "--engine", "max_model_len=512"))
    args.pop("name", None), args.pop("route_prefix", None)
    app = build_app(args)
    assert type(app).__name__ == "Application"


def test_config_file_applications_with_flag_overrides(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "http_options:\n  host: 0.0.0.0\n  port: 9000\n"
        "applications:\n"
        "  - name: llm\n    route_prefix: /a\n    import_path: cluster.app:build_app\n"
        "    args:\n      num_replicas: 2\n      engine: {max_model_len: 1024, dtype: float32}\n"
        "      ray_actor_options: {num_gpus: 1}\n")
    apps, http = load_applications(parse("serve", "--config", str(config), "--model", "m",
                                         "--engine", "max_model_len=256", "--num-cpus", "2"))
    assert http == {"host": "0.0.0.0", "port": 9000}
    assert apps == [{"import_path": "cluster.app:build_app", "args": {
        "num_replicas": 2, "model": "m", "name": "llm", "route_prefix": "/a",
        "engine": {"max_model_len": 256, "dtype": "float32"},
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 2.0}}}]


def test_without_config_the_default_app_is_deployed():
    apps, http = load_applications(parse("serve", "--model", "m"))
    assert apps == [{"import_path": "cluster.app:build_app", "args": {"model": "m"}}] and http == {}


def test_generate_parses_prompts_and_embeds_in_order():
    ns = parse("generate", "--prompt", "a", "--embeds", "x.pt", "--prompt", "b",
               "--max-tokens", "5", "--temperature", "0.7", "--model", "m")
    assert ns.prompt == ["a", "b"] and ns.embeds == ["x.pt"]
    assert (ns.max_tokens, ns.temperature, ns.model) == (5, 0.7, "m")


def test_generate_without_prompts_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        main(["generate"])
    assert "at least one" in str(exit_info.value.code)


def test_generate_embeds_file_matches_text_prompt(tmp_path, capsys):
    """One process, both inputs: the embeds of a prompt's tokens give the prompt's greedy text."""
    from cluster import LLM

    llm = LLM()
    ids = llm.get_tokenizer()("The capital of France is")["input_ids"]
    embeds = llm.get_input_embeddings(ids)
    del llm
    path = tmp_path / "france.pt"
    torch.save(embeds, path)
    assert main(["generate", "--embeds", str(path), "--prompt", "The capital of France is",
                 "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    sections = re.split(r"^--- .*$", out, flags=re.M)[1:]
    assert len(sections) == 2 and sections[0].strip() and sections[0] == sections[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_status_and_clean_shutdown_on_sigterm():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--num-cpus", "0.25",
         "--object-store-mb", "128"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    temp_dir = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        ready = next((l for l in lines if "Ctrl-C to stop" in l), None)
        assert ready, "".join(lines[-30:])
        assert any(f"serving at http://127.0.0.1:{port}/v1" in l for l in lines)
        address, temp_dir = re.search(r"Ray at (\S+), logs in (\S+);", ready).groups()
        assert Path(temp_dir).is_dir()

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:
            assert json.load(r)["data"][0]["id"]

        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", address],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        assert "raylm: RUNNING" in status.stdout and "Replica: HEALTHY" in status.stdout

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-2000:]
        assert "shutting down" in rest
        assert not Path(temp_dir).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
