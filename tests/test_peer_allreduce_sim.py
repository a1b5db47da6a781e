"""The peer-memory all-reduce kernels' protocol (pushes, flags, halves, call counts, one-shot and
looped grids, the fused add + RMSNorm) on the CPU under Triton's interpreter, one rank against
simulated peers (tests/peer_allreduce_sim.py). Needs the triton package (not in the CPU test
install: skipped there; the GPU machines have it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_one_rank_against_simulated_peers():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "tests.peer_allreduce_sim"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peer all-reduce simulation: ok" in run.stdout
