"""replicas.async_engine.AsyncEngine on the real engine (embedded default model), no Ray."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from replicas.async_engine import AsyncEngine, EngineDeadError
from replicas.sampling_params import SamplingParams
from tiny_model import TINY_ENGINE, tiny_config


DEADLINE_S = 60  # every wait in these tests ends by then


@pytest.fixture(scope="module")
def aengine():
    from replicas.engine import LLMEngine

    ae = AsyncEngine(LLMEngine.from_kwargs(model=None, max_model_len=512))
    yield ae
    ae.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


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


def idle_within(ae: AsyncEngine, timeout_s: float = DEADLINE_S) -> bool:
    """Whether the engine goes idle (aborts are applied at its next step) before the deadline."""
    deadline = time.monotonic() + timeout_s
    while not idle(ae):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


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
    assert idle_within(aengine)


def test_task_cancellation_aborts(aengine):
    async def cancel_midway():
        started = asyncio.Event()

        async def consume():
            async for _ in aengine.generate("cancelled", "Count to a thousand:",
                                            SamplingParams(max_tokens=400, ignore_eos=True)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = aengine.num_aborted
    run(cancel_midway())
    assert aengine.num_aborted == before + 1
    assert idle_within(aengine)


def test_bad_prompt_raises_before_any_output_and_nothing_leaks(aengine):
    async def bad():
        return [o async for o in aengine.generate("bad", {"prompt_token_ids": []}, SamplingParams())]

    with pytest.raises(ValueError):
        run(bad())
    assert aengine.num_streams == 0 and idle(aengine)


def test_abort_of_a_running_request_ends_it_with_abort(aengine):
    params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def abort_after_first_output():
        outs = aengine.generate("to-abort", "Write a long story.", params)
        first = await asyncio.wait_for(outs.__anext__(), DEADLINE_S)
        assert aengine.abort("to-abort") is True
        return first, await asyncio.wait_for(_last(outs), DEADLINE_S)

    first, last = run(abort_after_first_output())
    assert not first.finished and last.finished
    assert last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 400


def test_abort_that_overtakes_its_request_still_ends_it(aengine):
    """A caller may submit and abort at once; the abort can reach the replica first."""
    assert aengine.abort("overtaken") is False
    last = run(asyncio.wait_for(_last(aengine.generate("overtaken", "Write a long story.",
                                                       SamplingParams(max_tokens=400, ignore_eos=True))),
                                DEADLINE_S))
    assert last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 400
    assert idle_within(aengine)


# -- a failing engine ------------------------------------------------------------------------------
LONG = SamplingParams(max_tokens=1000, ignore_eos=True)


@pytest.fixture
def tiny_engine(tmp_path):
    """A fresh AsyncEngine on a tiny random model: these tests kill it."""
    from replicas.engine import LLMEngine

    ae = AsyncEngine(LLMEngine.from_kwargs(model=tiny_config(tmp_path), **TINY_ENGINE))
    yield ae
    ae.shutdown()


def break_weights(ae: AsyncEngine) -> None:
    """A real failure: the model loses its weights under the running engine (as after a failed
    reload), so its next forward pass raises. The old tensors are swapped out, not freed, so a
    forward pass already running finishes on them."""
    for module in ae.engine.runner.model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.new_empty(0), requires_grad=False))


async def _last(outs):
    last = None
    async for out in outs:
        last = out
    return last


async def _outcome(outs) -> str:
    """How one request ended: "finished" or the name of the exception it raised."""
    try:
        await _last(outs)
        return "finished"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        return type(e).__name__


async def _running(ae: AsyncEngine, n: int) -> list:
    """n long requests, each past its first output (so they are in the engine's batch)."""
    streams = [ae.generate(f"long-{i}", f"Story number {i}:", LONG) for i in range(n)]
    for s in streams:
        assert not (await asyncio.wait_for(s.__anext__(), DEADLINE_S)).finished
    return streams


def test_a_failing_step_ends_every_waiting_request_then_refuses_new_ones(tiny_engine):
    async def scenario():
        streams = await _running(tiny_engine, 4)
        break_weights(tiny_engine)
        return await asyncio.wait_for(asyncio.gather(*(_outcome(s) for s in streams)), DEADLINE_S)

    assert run(scenario()) == ["EngineDeadError"] * 4
    assert not tiny_engine.is_alive() and "engine loop died" in tiny_engine.dead_reason
    assert tiny_engine.num_streams == 0
    with pytest.raises(EngineDeadError):
        run(_last(tiny_engine.generate("after", "Hello", SamplingParams(max_tokens=2))))


def test_no_request_that_arrives_as_the_loop_dies_waits_forever(tiny_engine):
    """Requests keep arriving while the loop dies: each one ends (none is left behind)."""
    async def scenario():
        await _running(tiny_engine, 1)
        break_weights(tiny_engine)
        tasks = []
        for i in range(300):
            tasks.append(asyncio.create_task(_outcome(tiny_engine.generate(f"r{i}", "Hi", LONG))))
            await asyncio.sleep(0)
        return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)

    outcomes = run(scenario())
    assert set(outcomes) == {"EngineDeadError"}, outcomes
    assert tiny_engine.num_streams == 0


def test_injected_fault_fails_the_loop_as_a_failing_step_does(tiny_engine):
    async def scenario():
        streams = await _running(tiny_engine, 2)
        tiny_engine.inject_fault("test fault")
        return await asyncio.wait_for(asyncio.gather(*(_outcome(s) for s in streams)), DEADLINE_S)

    assert run(scenario()) == ["EngineDeadError"] * 2
    assert "InjectedFault('test fault')" in tiny_engine.dead_reason


def test_shutdown_ends_waiting_requests(tiny_engine):
    async def scenario():
        streams = await _running(tiny_engine, 2)
        await asyncio.to_thread(tiny_engine.shutdown)
        return await asyncio.wait_for(asyncio.gather(*(_outcome(s) for s in streams)), DEADLINE_S)

    assert run(scenario()) == ["EngineDeadError"] * 2
    assert tiny_engine.dead_reason == "engine shut down"


# -- delta streams ---------------------------------------------------------------------------------
def _joined(batches) -> dict[int, dict]:
    """Each completion's deltas appended: text, token ids, logprobs entries and finish reasons."""
    out: dict[int, dict] = {}
    for batch in batches:
        for o in batch:
            for c in o.outputs:
                d = out.setdefault(c.index, {"text": "", "ids": [], "logprobs": [], "finishes": []})
                d["text"] += c.text
                d["ids"] += c.token_ids
                d["logprobs"] += c.logprobs or []
                d["finishes"] += [c.finish_reason] if c.finish_reason else []
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.0),
    SamplingParams(max_tokens=12, n=2, seed=5, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=0.0, stop=[" is"], ignore_eos=True),
], ids=["greedy", "n2-logprobs", "stop-string"])
def test_stream_deltas_add_up_to_the_cumulative_output(aengine, params):
    async def both():
        cumulative = [o async for o in aengine.generate("cum", "The capital of France is", params)][-1]
        batches = [b async for b in aengine.stream("delta", "The capital of France is", params)]
        return cumulative, batches

    cumulative, batches = run(both())
    joined = _joined(batches)
    for c in cumulative.outputs:
        assert joined[c.index]["text"] == c.text and joined[c.index]["ids"] == c.token_ids
        assert joined[c.index]["finishes"] == [c.finish_reason]
        assert joined[c.index]["logprobs"] == (c.logprobs or [])
    outs = [o for b in batches for o in b]
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert sum(o.prompt_token_ids is not None for o in outs) == 1  # the prompt fields come once
    assert idle(aengine) and aengine.num_streams == 0


def test_stream_folds_the_steps_made_during_its_interval(aengine):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def batches(interval_s):
        return [b async for b in aengine.stream(f"fold-{interval_s}", "Once upon a time", params,
                                                interval_s=lambda: interval_s)]

    every_step, folded = run(batches(0.0)), run(batches(0.5))
    assert _joined(every_step)[0]["ids"] == _joined(folded)[0]["ids"]
    assert _joined(every_step)[0]["text"] == _joined(folded)[0]["text"] != ""  # decoded once per yield
    assert len(folded) < len(every_step) and any(len(b) > 1 for b in folded)
    assert folded[-1][-1].finished
