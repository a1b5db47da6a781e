"""Debug mode: the engine checks its KV accounting whenever it goes idle, and fails loudly."""
import pytest

from cluster import LLM, SamplingParams


def test_idle_integrity_check_passes_then_catches_a_leak():
    llm = LLM(model=None, check_kv_integrity=True, num_gpu_blocks_override=12)
    outs = llm.generate(["Hello there"] * 4 + ["Tell me a story"] * 2,
                        SamplingParams(max_tokens=30, temperature=0.0), use_tqdm=False)
    assert all(o.finished for o in outs)
    llm.engine.kv.pool.blocks[0].ref_cnt += 1  # a reference nobody holds: what a leak looks like
    with pytest.raises(AssertionError, match="ref count"):
        llm.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.engine.kv.pool.blocks[0].ref_cnt -= 1  # undo it: every test's engines are checked afterwards
