"""replicas.engine_process: the engine in a child process, behind AsyncEngine and the Replica
(embedded default model on the CPU, no Ray), checked against the same engine in process."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from replicas.async_engine import AsyncEngine, EngineDeadError
from replicas.engine_process import EngineProcess
from replicas.sampling_params import SamplingParams

DEADLINE_S = 60
ENGINE = {"max_model_len": 512, "device": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def engines():
    from replicas.engine import LLMEngine

    child = AsyncEngine(EngineProcess(None, dict(ENGINE)))
    local = AsyncEngine(LLMEngine.from_kwargs(model=None, **ENGINE))
    yield child, local
    child.shutdown()
    child.engine.shutdown()
    local.shutdown()
    assert child.engine.proc.returncode == 0  # the child left when asked


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


async def streamed(ae: AsyncEngine, rid: str, prompt, params: SamplingParams) -> dict:
    """Every completion's text and token ids, put together from the delta stream."""
    text, ids, reasons = {}, {}, {}
    async for outs in ae.stream(rid, prompt, params):
        for out in outs:
            for c in out.outputs:
                text[c.index] = text.get(c.index, "") + c.text
                ids.setdefault(c.index, []).extend(c.token_ids)
                if c.finish_reason is not None:
                    reasons[c.index] = c.finish_reason
    return {"text": text, "ids": ids, "finish": reasons}


def idle_within(ae: AsyncEngine, timeout_s: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = ae.get_load()
        if load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks:
            return True
        time.sleep(0.02)
    return False


def test_streams_equal_the_in_process_engine_for_text_tokens_and_embeds(engines):
    child, local = engines
    ids = list(local.engine.tokenizer("The capital of France is").input_ids)
    embeds = local.engine.input_embeddings(ids).float().numpy()
    cases = [
        ("The three primary colors are", SamplingParams(max_tokens=12, temperature=0.0)),
        ({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0.0)),
        ({"prompt_embeds": embeds}, SamplingParams(max_tokens=12, temperature=0.0)),
        ("Once upon a time", SamplingParams(max_tokens=10, temperature=0.9, seed=7, n=2)),
        ("1, 2, 3, 4,", SamplingParams(max_tokens=24, temperature=0.0, stop=[" 7"])),  # the child detokenizes
    ]

    async def both(i, prompt, params):
        return await asyncio.gather(streamed(child, f"c{i}", prompt, params), streamed(local, f"l{i}", prompt, params))

    async def all_cases():
        return await asyncio.gather(*(both(i, p, sp) for i, (p, sp) in enumerate(cases)))

    results = run(all_cases())
    for (prompt, params), (from_child, from_local) in zip(cases, results):
        assert from_child == from_local, prompt if isinstance(prompt, str) else list(prompt)
        assert sorted(from_child["ids"]) == list(range(params.n))
        assert all(from_child["ids"][i] for i in range(params.n))
    assert results[-1][0]["finish"] == {0: "stop"} and not results[-1][0]["text"][0].endswith(" 7")
    assert idle_within(child)


def test_bad_prompts_fail_on_the_replica_side_and_the_child_keeps_serving(engines):
    child, _ = engines
    with pytest.raises(ValueError, match="max_model_len"):
        child.engine.prepare("hello " * 600, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError):
        child.engine.prepare({"prompt_embeds": [[1.0, 2.0]]}, SamplingParams(max_tokens=4))  # wrong width

    async def bad_then_good():
        with pytest.raises(ValueError):
            await streamed(child, "bad", "x " * 600, SamplingParams(max_tokens=4))
        return await streamed(child, "good", "Hello", SamplingParams(max_tokens=3, temperature=0.0))

    assert len(run(bad_then_good())["ids"][0]) == 3
    assert child.is_alive() and idle_within(child)


def test_a_consumer_that_leaves_aborts_its_request_and_frees_its_blocks(engines):
    child, _ = engines

    async def leave_early():
        stream = child.stream("leaver", "Tell me a long story:", SamplingParams(max_tokens=400, ignore_eos=True))
        got = 0
        async for outs in stream:
            got += sum(len(c.token_ids) for o in outs for c in o.outputs)
            if got >= 3:
                break
        await stream.aclose()
        return got

    assert run(leave_early()) >= 3
    assert idle_within(child)  # the child's load says every block is free again
    assert child.num_aborted >= 1


def test_replica_runs_its_engine_in_a_child_and_fails_cleanly_when_the_child_dies():
    from replicas.deployment import Replica
    from replicas.protocol import GenerateRequest

    replica = Replica(None, {"engine_process": True, "max_model_len": 512, "num_threads": 1, "device": "cpu"})
    engine = replica.engine
    try:
        assert isinstance(engine, EngineProcess) and engine.proc.poll() is None
        replica.check_health()
        assert engine.model_config.max_model_len == 512 and engine.device.type == "cpu"

        async def generate(rid, max_tokens):
            request = GenerateRequest(request_id=rid, prompt="Hello there",
                                      params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            return [chunk async for chunk in replica.generate(request)]

        chunks = run(generate("r1", 6))
        assert chunks[0].accepted and chunks[-1].finished
        assert sum(len(d.token_ids) for c in chunks for d in c.deltas) == 6
        # The first token rides with `accepted`: at most one message per step, none for acceptance.
        assert chunks[0].deltas[0].token_ids and len(chunks) <= 6

        async def killed_mid_stream():
            request = GenerateRequest(request_id="r2", prompt="Count:",
                                      params=SamplingParams(max_tokens=400, ignore_eos=True))
            seen = 0
            with pytest.raises(EngineDeadError):
                async for chunk in replica.generate(request):
                    seen += sum(len(d.token_ids) for d in chunk.deltas)
                    if seen and engine.proc.poll() is None:
                        engine.proc.kill()
            return seen

        assert run(killed_mid_stream()) > 0
        with pytest.raises(EngineDeadError):
            replica.check_health()  # Serve replaces the replica
        with pytest.raises(EngineDeadError):
            run(generate("r3", 2))  # later requests are refused at once (routers retry elsewhere)
    finally:
        replica.__del__()
    assert engine.proc.poll() is not None


def test_step_outputs_cross_the_process_boundary_unchanged():
    import pickle

    from replicas.engine_process import decode_outputs, encode_outputs
    from replicas.outputs import CompletionOutput, Logprob, RequestOutput

    outs = [
        RequestOutput("a", "hi", [1, 2], [CompletionOutput(0, "x", [5], -0.5, [{5: Logprob(-0.5, 1, "x")}], None)],
                      False, 2, [None, {2: Logprob(-1.0, 1, "b")}], 1, {"t": 1.0}),
        RequestOutput("b", None, None, [CompletionOutput(0, "", [7, 8], None, None, "length"),
                                        CompletionOutput(1, "yz", [], None, None, "stop", "z")], True, 12),
    ]
    assert decode_outputs(pickle.loads(pickle.dumps(encode_outputs(outs)))) == outs


def _engine_children() -> set[int]:
    """Pids of running engine processes (python -m replicas.engine_process)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"replicas.engine_process" in f.read():
                    found.add(int(pid))
        except OSError:
            pass
    return found


def _gone_within(pids: set[int], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pids & _engine_children():
            return True
        time.sleep(0.2)
    return False


def test_the_child_exits_when_its_replica_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        "import time\n"
        "from replicas.engine_process import EngineProcess\n"
        f"e = EngineProcess(None, {ENGINE!r})\n"
        "print(e.proc.pid, flush=True)\n"
        "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(owner.stdout.readline())
        assert child in _engine_children()
    finally:
        owner.kill()  # SIGKILL: no __del__, no shutdown message; only the socket closes
        owner.wait()
    assert _gone_within({child})


def test_serve_replica_with_the_engine_in_a_child_answers_the_openai_client(engines):
    from openai import OpenAI

    from serve_utils import serving

    _, local = engines
    before = _engine_children()
    app = {"name": "raylm", "route_prefix": "/", "num_replicas": 1,
           "engine": {"max_model_len": 512, "engine_process": True}}
    with serving("engine-process", app) as base:
        children = _engine_children() - before
        assert len(children) == 1  # the replica's engine
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        model = client.models.list().data[0].id
        prompt = "The three primary colors are"
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0.0, stream=True))
        expected = run(streamed_text(local, prompt, SamplingParams(max_tokens=12, temperature=0.0)))
        assert whole.choices[0].text == streamed == expected
        assert whole.usage.completion_tokens == 12
    assert _gone_within(children)  # Serve shut the replica down: its engine process went with it


async def streamed_text(ae: AsyncEngine, prompt: str, params: SamplingParams) -> str:
    return (await streamed(ae, "serve-check", prompt, params))["text"][0]
