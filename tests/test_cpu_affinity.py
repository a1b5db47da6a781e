"""The engine option cpu_affinity: a core list parsed and checked before an engine starts, and an
engine process whose every thread (the OpenMP pool included) runs only on the cores it names."""
from __future__ import annotations

import asyncio
import os

import pytest

from replicas.cpu_affinity import parse_cpu_list
from replicas.deployment import _default_num_threads
from replicas.sampling_params import SamplingParams

ALLOWED = sorted(os.sched_getaffinity(0))


def test_core_lists_parse_like_linux_cpu_lists():
    first = ALLOWED[0]
    assert parse_cpu_list(f"{first}") == [first]
    assert parse_cpu_list(first) == [first]
    assert parse_cpu_list([first, first]) == [first]
    if len(ALLOWED) > 1 and ALLOWED[1] == first + 1:
        assert parse_cpu_list(f"{first}-{first + 1}") == [first, first + 1]
        assert parse_cpu_list(f"{first + 1}, {first}") == [first, first + 1]


@pytest.mark.parametrize("bad", ["", "a", "3-1", "-1", "0-", [], [-1], [True], "1.5", 2.0])
def test_bad_core_lists_are_refused(bad):
    with pytest.raises(ValueError):
        parse_cpu_list(bad)


def test_cores_this_process_may_not_use_are_refused():
    with pytest.raises(ValueError, match="may not run on"):
        parse_cpu_list([max(ALLOWED) + 1000])


def test_a_replica_runs_as_many_threads_as_named_cores(monkeypatch):
    monkeypatch.delenv("RAYLM_NUM_THREADS", raising=False)
    assert _default_num_threads("cpu", [ALLOWED[0]]) == 1
    assert _default_num_threads("cpu") == len(ALLOWED)
    with pytest.raises(ValueError):
        _default_num_threads("cpu", "5-3")  # before any engine process starts


def _allowed_cores(pid: int) -> dict[int, str]:
    """thread id -> its Cpus_allowed_list, for every thread of a process."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            found[int(tid)] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
    return found


def test_engine_process_threads_run_on_the_named_core_only():
    from replicas.async_engine import AsyncEngine
    from replicas.engine_process import EngineProcess

    core = ALLOWED[-1]
    engine = EngineProcess(None, {"max_model_len": 512, "device": "cpu", "num_threads": 2, "cpu_affinity": f"{core}"})
    ae = AsyncEngine(engine)
    try:
        async def generate():
            async for out in ae.generate("pin-1", "The capital of France is",
                                         SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)):
                last = out
            return last

        out = asyncio.run(asyncio.wait_for(generate(), 120))
        assert len(out.outputs[0].token_ids) == 4
        threads = _allowed_cores(engine.proc.pid)
        assert len(threads) >= 2  # the main thread and torch's pool (num_threads=2), all held
        assert set(threads.values()) == {str(core)}, threads
        assert _allowed_cores(os.getpid())[os.getpid()] != str(core) or len(ALLOWED) == 1  # this process untouched
    finally:
        ae.shutdown()
        engine.shutdown()

