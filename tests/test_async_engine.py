"""replicas.async_engine.AsyncEngine on the real engine (embedded default model), no Ray."""
from __future__ import annotations

import asyncio

import pytest

from replicas.async_engine import AsyncEngine, EngineDeadError
from replicas.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def aengine():
    from replicas.engine import LLMEngine

    ae = AsyncEngine(LLMEngine.from_kwargs(model=None, max_model_len=512))
    yield ae
    ae.shutdown()


def run(coro):
    return asyncio.run(coro)


async def final(ae: AsyncEngine, rid: str, prompt, params: SamplingParams):
    outs = [o async for o in ae.generate(rid, prompt, params)]
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    for a, b in zip(outs, outs[1:]):  # cumulative: text and tokens only grow
        assert b.outputs[0].text.startswith(a.outputs[0].text)
        assert b.outputs[0].token_ids[:len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
    return outs[-1]


def idle(ae: AsyncEngine) -> bool:
    load = ae.get_load()
    return load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks


def test_concurrent_requests_batch_and_match_sequential_results(aengine):
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = [f"Fact number {i}:" for i in range(6)]

    async def together():
        return await asyncio.gather(*(final(aengine, f"c{i}", p, greedy) for i, p in enumerate(prompts)))

    concurrent = run(together())
    sequential = [run(final(aengine, f"s{i}", p, greedy)) for i, p in enumerate(prompts)]
    assert [o.outputs[0].token_ids for o in concurrent] == [o.outputs[0].token_ids for o in sequential]
    assert idle(aengine) and aengine.num_streams == 0


def test_closing_the_iterator_aborts_and_frees_blocks(aengine):
    async def leave_early():
        gen = aengine.generate("leaver", "Write a long story.", SamplingParams(max_tokens=400, ignore_eos=True))
        first = await gen.__anext__()
        await gen.aclose()
        return first

    before = aengine.num_aborted
    assert not run(leave_early()).finished
    assert aengine.num_aborted == before + 1

    async def settle():
        for _ in range(200):
            if idle(aengine):
                return True
            await asyncio.sleep(0.05)
        return False

    assert run(settle())


def test_task_cancellation_aborts(aengine):
    async def cancel_midway():
        task = asyncio.create_task(final(aengine, "cancelled", "Count to a thousand:",
                                         SamplingParams(max_tokens=400, ignore_eos=True)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if idle(aengine):
                return True
            await asyncio.sleep(0.05)
        return False

    assert run(cancel_midway())


def test_bad_prompt_raises_before_any_output_and_nothing_leaks(aengine):
    async def bad():
        return [o async for o in aengine.generate("bad", {"prompt_token_ids": []}, SamplingParams())]

    with pytest.raises(ValueError):
        run(bad())
    assert aengine.num_streams == 0 and idle(aengine)


def test_dead_loop_is_reported():
    """Fault injection: an engine whose step() fails. The loop stops, is_alive() turns false, the
    waiting request gets EngineDeadError and later requests are refused."""
    from replicas.engine import LLMEngine

    class FailingStep(LLMEngine):
        def step(self):
            raise RuntimeError("injected failure")

    ae = AsyncEngine(FailingStep.from_kwargs(model=None, max_model_len=256))

    async def one(rid):
        return [o async for o in ae.generate(rid, "Hello", SamplingParams(max_tokens=2))]

    with pytest.raises(EngineDeadError):
        run(one("first"))
    assert not ae.is_alive()
    with pytest.raises(EngineDeadError):
        run(one("second"))
    ae.shutdown()
