"""Triton kernels on the CPU under Triton's interpreter, each harness in its own process (the
interpreter is chosen when the kernels are defined):

- tests/peer_allreduce_sim.py: the peer-memory all-reduce kernels' protocol (pushes, flags, halves,
  call counts, one-shot and looped grids, the fused add + RMSNorm), one rank against simulated peers;
- tests/kernels_sim.py: the GEMV (plain, per-matrix configs, with SiLU-mul), the skinny GEMM, SiLU-mul,
  rotary, add + RMSNorm, and the attention backend's kernels (rope + KV write, KV write, varlen
  and split attention, split merge) against the torch ops, the torch backend or the unfused kernels.

Needs the triton package (not in the CPU test install: skipped there; the GPU machines have it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("module,done", [("tests.peer_allreduce_sim", "peer all-reduce simulation: ok"),
                                         ("tests.kernels_sim", "kernels simulation: ok")])
def test_kernels_under_the_interpreter(module, done):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert done in run.stdout
