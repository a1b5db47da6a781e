"""Soak: a long mixed load against `raylm serve --num-replicas 2`, with one replica's actor killed
and, later, another replica's engine failed (the `fault_injection` debug hook) mid-run.

The mix: greedy probes as text, token ids, prompt embeds (JSON base64 torch.save; msgpack raw
bytes) and streams, client-cancelled streams, malformed bodies and oversize requests. Each
request ends as one of
  completed    a whole answer; a greedy probe's text equals its reference (computed offline)
  cancelled    the client closed its stream after the first token, as it meant to
  clean error  an OpenAI error body with the 4xx the request deserves, or a 503/429, or an
               SSE error event
  lost         no answer in time, a 500, a cut stream without an error event, a wrong answer
Server memory is the RSS of every process of the Ray cluster `raylm serve` started, sampled
after the warm-up and again once the load has drained.

    python bench/soak.py --minutes 10
Prints a table and writes bench/results/soak-<cpu>.json; exits 1 when anything was lost, the
replicas were not idle at the end, or memory grew by more than --max-growth.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import sys
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import openai
import torch
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.machine import device_name, machine, slug, versions  # noqa: E402
from bench.serve import PROMPTS, RESULTS, LocalServer, b64_torch_save  # noqa: E402

MAX_TOKENS = 16  # per probe
MAX_MODEL_LEN = 1024
SERVE_ARGS = ["--num-replicas", "2", "--num-cpus", "0.5", "--object-store-mb", "256",
              "--engine", "num_threads=1", "--engine", f"max_model_len={MAX_MODEL_LEN}",
              "--engine", "fault_injection=true"]
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::raylm#Replica#"
MSGPACK = "application/msgpack"
CLEAN_BUSY = (429, 503)  # a clean "not now" for any request


# ------------------------------------------------------------------------------ outcomes

@dataclass
class Outcome:
    kind: str
    result: str  # completed | cancelled | clean_error | lost
    detail: str = ""


def lost(kind: str, detail: str) -> Outcome:
    return Outcome(kind, "lost", detail[:300])


def is_openai_error(body) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def judge_status(kind: str, status: int, body, expected: tuple[int, ...] = ()) -> Outcome:
    """An HTTP error answer: clean when it is expected (or 429/503) with OpenAI's error body."""
    if status in expected + CLEAN_BUSY and is_openai_error(body):
        return Outcome(kind, "clean_error", str(status))
    return lost(kind, f"HTTP {status}: {json.dumps(body)[:200] if not isinstance(body, str) else body[:200]}")


def judge_text(kind: str, text: str, reference: str) -> Outcome:
    if text == reference:
        return Outcome(kind, "completed")
    return lost(kind, f"wrong answer: {text!r} != reference {reference!r}")


# ------------------------------------------------------------------------------ payloads

@dataclass
class Probe:
    """A greedy prompt in every form, with the answer the offline engine gives."""

    text: str
    token_ids: list[int]
    embeds: np.ndarray  # (len(token_ids), hidden) float32: the token ids' input embeddings
    b64: str  # base64 torch.save of embeds
    answer_text: str  # reference for the text prompt
    answer_ids: str  # reference for token ids and for embeds


def build_probes() -> list[Probe]:
    from cluster import LLM, SamplingParams

    llm = LLM(model=None, max_model_len=MAX_MODEL_LEN)
    tok = llm.get_tokenizer()
    ids = [tok(text)["input_ids"] for text in PROMPTS]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    by_text = llm.generate(list(PROMPTS), greedy, use_tqdm=False)
    by_ids = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, use_tqdm=False)
    probes = []
    for text, i, t, d in zip(PROMPTS, ids, by_text, by_ids):
        emb = llm.get_input_embeddings(i).float().cpu()
        probes.append(Probe(text, list(i), emb.numpy(), b64_torch_save(emb), t.outputs[0].text,
                            d.outputs[0].text))
    return probes


@dataclass
class BadRequest:
    """A request the server must refuse with one of `expected` (never a 500, never a 200)."""

    name: str
    body: bytes
    content_type: str
    expected: tuple[int, ...]
    oversize: bool = False


def torch_save_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def legacy_then_zip() -> bytes:
    """A legacy (non-zip) torch pickle with a valid torch.save zip behind it."""
    return torch_save_bytes(torch.zeros(2, 2), _use_new_zipfile_serialization=False) + torch_save_bytes(
        torch.zeros(2, 2))


def zip_with_extra_record(hidden: int) -> bytes:
    raw = io.BytesIO(torch_save_bytes(torch.zeros(2, hidden)))
    with zipfile.ZipFile(raw, "a") as z:
        z.writestr("archive/DATA.PKL", b"not what torch.save writes")
    return raw.getvalue()


def bad_requests(model: str, hidden: int) -> list[BadRequest]:
    too_big = (400, 413)

    def js(name, body, expected=(400,)):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return BadRequest(name, raw, "application/json", expected, expected == too_big)

    def mp(name, body, expected=(400,)):
        raw = body if isinstance(body, bytes) else msgpack.packb(body)
        return BadRequest(name, raw, MSGPACK, expected, expected == too_big)

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    base = {"model": model, "max_tokens": 4}
    good = torch_save_bytes(torch.zeros(3, hidden))
    return [
        js("bad json", b'{"prompt": "x", '),
        js("json array", b"[1, 2, 3]"),
        js("bad base64", {**base, "prompt_embeds": "!!not base64!!"}),
        js("wrong hidden size", {**base, "prompt_embeds": b64(torch_save_bytes(torch.zeros(4, 17)))}),
        js("truncated torch.save", {**base, "prompt_embeds": b64(good[: len(good) // 2])}),
        js("legacy pickle before a zip", {**base, "prompt_embeds": b64(legacy_then_zip())}),
        js("case-colliding zip record", {**base, "prompt_embeds": b64(zip_with_extra_record(hidden))}),
        js("pickled dict", {**base, "prompt_embeds": b64(torch_save_bytes({"t": torch.zeros(2, hidden)}))}),
        js("negative max_tokens", {**base, "prompt": "x", "max_tokens": -3}),
        js("string temperature", {**base, "prompt": "x", "temperature": "hot"}),
        js("token id outside the vocabulary", {**base, "prompt": [10 ** 9]}),
        js("seed beyond 64 bits", {**base, "prompt": "x", "seed": 1 << 70}),
        js("echo with embeds", {**base, "prompt_embeds": b64(good), "echo": True}),
        js("unknown model", {**base, "model": "no-such-model", "prompt": "x"}, (404,)),
        mp("msgpack garbage", b"\xc1\xc1\xc1\xc1"),
        mp("msgpack raw embeds, unknown dtype",
           {**base, "prompt_embeds": [{"dtype": "object", "shape": [2, hidden], "data": b"\0" * 8}]}),
        mp("msgpack raw embeds, short data",
           {**base, "prompt_embeds": [{"dtype": "float32", "shape": [2, hidden], "data": b"\0" * 8}]}),
        mp("msgpack flood of empty maps", {**base, "prompt": [{}] * 200_000}, too_big),
        # oversize
        js("embeds over the size cap", {**base, "prompt_embeds": b64(torch_save_bytes(
            torch.zeros(MAX_MODEL_LEN + 64, hidden)))}, too_big),
        mp("raw embeds declaring 4M rows",
           {**base, "prompt_embeds": [{"dtype": "float32", "shape": [1 << 22, hidden], "data": b"\0" * 16}]},
           too_big),
        js("prompt longer than max_model_len", {**base, "prompt": [1] * (MAX_MODEL_LEN + 200)}, too_big),
        js("max_tokens beyond max_model_len", {**base, "prompt": "x", "max_tokens": 4 * MAX_MODEL_LEN}, too_big),
    ]


# ------------------------------------------------------------------------------ request kinds

@dataclass
class Ctx:
    url: str
    model: str
    oa: AsyncOpenAI
    session: aiohttp.ClientSession
    probes: list[Probe]
    bad: list[BadRequest]
    rng: random.Random

    def probe(self) -> Probe:
        return self.rng.choice(self.probes)

    def greedy(self) -> dict:
        return {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.0}


async def openai_probe(ctx: Ctx, kind: str, prompt, reference: str, extra: dict | None = None) -> Outcome:
    try:
        out = await ctx.oa.completions.create(prompt=prompt, extra_body=extra, **ctx.greedy())
    except openai.APIStatusError as e:
        return judge_status(kind, e.status_code, e.body if isinstance(e.body, dict) else {"error": e.body})
    except openai.APIError as e:
        return lost(kind, f"{type(e).__name__}: {e}")
    return judge_text(kind, out.choices[0].text, reference)


async def k_text(ctx: Ctx) -> Outcome:
    p = ctx.probe()
    return await openai_probe(ctx, "text", p.text, p.answer_text)


async def k_tokens(ctx: Ctx) -> Outcome:
    p = ctx.probe()
    return await openai_probe(ctx, "tokens", p.token_ids, p.answer_ids)


async def k_embeds_json(ctx: Ctx) -> Outcome:
    p = ctx.probe()
    return await openai_probe(ctx, "embeds json", "", p.answer_ids, {"prompt_embeds": p.b64})


async def k_embeds_msgpack(ctx: Ctx) -> Outcome:
    p = ctx.probe()
    raw = {"dtype": "float32", "shape": list(p.embeds.shape), "data": p.embeds.astype("<f4").tobytes()}
    body = msgpack.packb({**ctx.greedy(), "prompt_embeds": [raw]})
    headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
    async with ctx.session.post(f"{ctx.url}/completions", data=body, headers=headers) as resp:
        raw_answer = await resp.read()
        answer = decode_answer(raw_answer, resp.content_type)
        if resp.status != 200:
            return judge_status("embeds msgpack", resp.status, answer)
    return judge_text("embeds msgpack", answer["choices"][0]["text"], p.answer_ids)


def decode_answer(raw: bytes, content_type: str):
    try:
        return msgpack.unpackb(raw) if content_type == MSGPACK else json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


async def read_stream(stream, on_text=None) -> tuple[str, set[str | None]]:
    """(text, finish reasons) of a streamed completion; on_text(text) may ask to stop early."""
    text, finishes = "", set()
    async for chunk in stream:
        for c in chunk.choices:
            text += c.text
            if c.finish_reason:
                finishes.add(c.finish_reason)
        if on_text is not None and text and on_text(text):
            break
    return text, finishes


async def k_stream(ctx: Ctx) -> Outcome:
    p = ctx.probe()
    embeds = ctx.rng.random() < 0.5
    prompt, extra, reference = ("", {"prompt_embeds": p.b64}, p.answer_ids) if embeds else (p.text, None, p.answer_text)
    try:
        stream = await ctx.oa.completions.create(prompt=prompt, extra_body=extra, stream=True, **ctx.greedy())
        text, finishes = await read_stream(stream)
    except openai.APIStatusError as e:
        return judge_status("stream", e.status_code, e.body if isinstance(e.body, dict) else {"error": e.body})
    except openai.APIError as e:  # an SSE error event (a connection error is lost)
        if isinstance(e, openai.APIConnectionError) or not isinstance(e.body, dict) or "type" not in e.body:
            return lost("stream", f"{type(e).__name__}: {e}")
        return Outcome("stream", "clean_error", f"error event {e.body.get('type')}")
    except Exception as e:  # noqa: BLE001 - a transport error mid-stream: the stream was cut
        return lost("stream", f"cut: {type(e).__name__}: {e}")
    if not finishes:
        return lost("stream", f"cut stream without an error event after {text!r}")
    return judge_text("stream", text, reference)


async def k_cancelled(ctx: Ctx) -> Outcome:
    try:
        stream = await ctx.oa.completions.create(
            model=ctx.model, prompt=ctx.probe().text, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True})
        text, finishes = await read_stream(stream, on_text=lambda t: True)
        await stream.close()
    except openai.APIStatusError as e:
        return judge_status("cancelled", e.status_code, e.body if isinstance(e.body, dict) else {"error": e.body})
    except Exception as e:  # noqa: BLE001
        return lost("cancelled", f"{type(e).__name__}: {e}")
    return Outcome("cancelled", "cancelled" if text else "completed")


async def k_bad(ctx: Ctx, oversize: bool) -> Outcome:
    kind = "oversize" if oversize else "malformed"
    bad = ctx.rng.choice([b for b in ctx.bad if b.oversize == oversize])
    async with ctx.session.post(f"{ctx.url}/completions", data=bad.body,
                                headers={"Content-Type": bad.content_type}) as resp:
        answer = decode_answer(await resp.read(), resp.content_type)
        if resp.status == 200:
            return lost(kind, f"{bad.name}: accepted")
        out = judge_status(kind, resp.status, answer, bad.expected)
    out.detail = f"{bad.name}: {out.detail}"
    return out


async def k_malformed(ctx: Ctx) -> Outcome:
    return await k_bad(ctx, oversize=False)


async def k_oversize(ctx: Ctx) -> Outcome:
    return await k_bad(ctx, oversize=True)


KINDS = {  # name: (function, weight)
    "text": (k_text, 3), "tokens": (k_tokens, 2), "embeds json": (k_embeds_json, 2),
    "embeds msgpack": (k_embeds_msgpack, 2), "stream": (k_stream, 3), "cancelled": (k_cancelled, 1),
    "malformed": (k_malformed, 1), "oversize": (k_oversize, 1),
}


async def run_one(ctx: Ctx, kind: str, timeout_s: float) -> Outcome:
    try:
        return await asyncio.wait_for(KINDS[kind][0](ctx), timeout_s)
    except asyncio.TimeoutError:
        return lost(kind, f"no answer in {timeout_s:.0f}s")
    except (aiohttp.ClientError, ConnectionError) as e:
        return lost(kind, f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------ the server

def descendants(root: int) -> list[int]:
    """root and every process below it (Ray's GCS, raylet, workers and replicas)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def role(pid: int) -> str:
    """What a process is: Ray titles its workers `ray::<actor class>.<method running>`."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if args[0].startswith("ray::"):
        return args[0].split(" ")[0].split(".")[0]
    scripts = [os.path.basename(a) for a in args[1:] if a.endswith(".py")]  # Ray's python daemons
    return scripts[0] if scripts else os.path.basename(args[0])


def memory_by_role(root: int) -> dict[str, float]:
    """RSS in MB of `root` (the `raylm serve` driver) and every process below it, by role."""
    mb: Counter = Counter()
    for pid in descendants(root):
        mb["raylm serve (driver)" if pid == root else role(pid)] += rss_kb(pid) / 1024
    return {k: round(v, 1) for k, v in sorted(mb.items())}


class SoakServer:
    """`raylm serve` in a subprocess; this process joins its Ray cluster to act on replicas."""

    def __init__(self, serve_args: list[str]):
        self.local = LocalServer(serve_args)
        self.url = self.local.url

    def start(self) -> None:
        from cluster.cli import connect_ray

        self.local.wait_ready()
        log = Path(self.local.log.name).read_text(errors="replace")
        connect_ray(re.search(r"Ray at (\S+?)(?:,|;)", log).group(1))

    def memory(self) -> dict[str, float]:
        """RSS in MB of this server's processes, by role."""
        return memory_by_role(self.local.proc.pid)

    def replica_ids(self) -> list[str]:
        import ray

        return sorted(a["name"][len(REPLICA_ACTOR_PREFIX):] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(REPLICA_ACTOR_PREFIX))

    def kill_replica(self, replica_id: str) -> None:
        import ray

        ray.kill(ray.get_actor(REPLICA_ACTOR_PREFIX + replica_id, namespace="serve"), no_restart=True)

    def fail_engine(self, replica_id: str) -> str | None:
        from ray import serve

        from replicas.protocol import ReplicaTarget

        handle = serve.get_deployment_handle("Replica", app_name="raylm")
        return handle.inject_fault.remote(ReplicaTarget(replica_id)).result(timeout_s=60)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        self.local.stop()


async def get_json(session: aiohttp.ClientSession, url: str):
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def live_replicas(session: aiohttp.ClientSession, base: str) -> int:
    try:
        status, body = await get_json(session, f"{base}/health")
    except (aiohttp.ClientError, ValueError):
        return 0
    return body.get("live_replicas", 0) if status == 200 else 0


async def replica_gauge(session: aiohttp.ClientSession, base: str, name: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M))


# ------------------------------------------------------------------------------ the run

@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    events: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)  # {t_s, rss_mb, by_role}

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def event(self, what: str, **info) -> None:
        self.events.append({"t_s": self.now(), "event": what, **info})
        print(f"[{self.now():7.1f}s] {what} {info if info else ''}", flush=True)


async def wait_replaced(server: SoakServer, session, base: str, gone: str, tl: Timeline,
                        timeout_s: float = 300) -> None:
    """Wait until Serve has stopped replica `gone` and the router sees two live replicas."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = await asyncio.to_thread(server.replica_ids)
        if gone not in ids and len(ids) == 2 and await live_replicas(session, base) == 2:
            tl.event("two replicas live again", replaced=gone, now=ids)
            return
        await asyncio.sleep(1)
    tl.event("no replacement in time", replica=gone)


async def disrupt(server: SoakServer, session, base: str, tl: Timeline, kill_at: float, fault_at: float) -> None:
    """Kill one replica's actor at `kill_at` s; fail the other one's engine at `fault_at` s."""
    await asyncio.sleep(max(0.0, kill_at - tl.now()))
    victim, survivor = await asyncio.to_thread(server.replica_ids)
    await asyncio.to_thread(server.kill_replica, victim)
    tl.event("killed replica actor", replica=victim)
    await wait_replaced(server, session, base, victim, tl)
    await asyncio.sleep(max(0.0, fault_at - tl.now()))
    failed = survivor  # the replica that has run longest
    hit = await asyncio.to_thread(server.fail_engine, failed)
    tl.event("failed the engine of replica", replica=failed, hit=hit)
    await wait_replaced(server, session, base, failed, tl)


async def sample_memory(server: SoakServer, tl: Timeline, every_s: float) -> None:
    while True:
        by_role = await asyncio.to_thread(server.memory)
        tl.memory.append({"t_s": tl.now(), "rss_mb": round(sum(by_role.values()), 1), "by_role": by_role})
        await asyncio.sleep(every_s)


async def worker(ctx: Ctx, stop_at: float, timeout_s: float, outcomes: list[Outcome]) -> None:
    names = list(KINDS)
    weights = [KINDS[k][1] for k in names]
    while time.monotonic() < stop_at:
        outcomes.append(await run_one(ctx, ctx.rng.choices(names, weights)[0], timeout_s))


async def settle_idle(session, base: str, timeout_s: float = 120) -> bool:
    """Whether every replica reports nothing running or waiting (cancelled requests included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = await replica_gauge(session, base, "raylm_replica_running_requests")
        waiting = await replica_gauge(session, base, "raylm_replica_waiting_requests")
        if running == 0 and waiting == 0:
            return True
        await asyncio.sleep(2)
    return False


async def soak(args, server: SoakServer, probes: list[Probe]) -> dict:
    base = server.url.rsplit("/v1", 1)[0]
    tl = Timeline()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = (await get_json(session, f"{server.url}/models"))[1]["data"][0]["id"]
        oa = AsyncOpenAI(api_key="EMPTY", base_url=server.url, max_retries=0, timeout=args.timeout)
        bad = bad_requests(model, probes[0].embeds.shape[1])
        ctxs = [Ctx(server.url, model, oa, session, probes, bad, random.Random(args.seed + i))
                for i in range(args.concurrency)]
        warm = [await run_one(ctxs[0], k, args.timeout) for k in KINDS]  # one of each, first costs
        tl.event("warmed up", outcomes=[o.result for o in warm])
        start = await asyncio.to_thread(server.memory)
        tl.event("memory at start", rss_mb=round(sum(start.values()), 1))
        run_s = args.minutes * 60
        tl.t0 = time.monotonic()
        sampler = asyncio.create_task(sample_memory(server, tl, args.memory_every))
        chaos = asyncio.create_task(disrupt(server, session, base, tl, run_s * args.kill_at, run_s * args.fault_at))
        outcomes: list[Outcome] = []
        stop_at = time.monotonic() + run_s
        await asyncio.gather(*(worker(c, stop_at, args.timeout, outcomes) for c in ctxs))
        tl.event("load stopped", requests=len(outcomes))
        if not chaos.done():
            tl.event("waiting for the replicas to be replaced")
        await asyncio.wait_for(chaos, 600)
        idle = await settle_idle(session, base)
        await asyncio.sleep(args.settle)
        end = await asyncio.to_thread(server.memory)
        sampler.cancel()
        tl.event("memory at end", rss_mb=round(sum(end.values()), 1), idle=idle)
        await oa.close()
    return {"outcomes": outcomes, "warm": warm, "timeline": tl, "start": start, "end": end,
            "idle": idle, "model": model}


# ------------------------------------------------------------------------------ report

RESULT_COLUMNS = ("completed", "cancelled", "clean_error", "lost")


def tally(outcomes: list[Outcome]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for o in outcomes:
        row = rows.setdefault(o.kind, {"sent": 0, **{c: 0 for c in RESULT_COLUMNS}})
        row["sent"] += 1
        row[o.result] += 1
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("sent", *RESULT_COLUMNS)}
    return rows


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'kind':<16}{'sent':>7}{'completed':>11}{'cancelled':>11}{'clean err':>11}{'lost':>7}")
    for kind, r in rows.items():
        print(f"{kind:<16}{r['sent']:>7}{r['completed']:>11}{r['cancelled']:>11}{r['clean_error']:>11}{r['lost']:>7}")


def print_memory(start: dict[str, float], mid: dict[str, float], end: dict[str, float]) -> None:
    """RSS by process at the start, half way and at the end (leaks grow; warm-ups level off)."""
    print(f"  {'process':<40}{'start MB':>10}{'half way':>10}{'end MB':>10}")
    for name in sorted(set(start) | set(end)):
        print(f"  {name:<40}{start.get(name, 0):>10.0f}{mid.get(name, 0):>10.0f}{end.get(name, 0):>10.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    parser.add_argument("--kill-at", type=float, default=0.3, help="fraction of the run: kill a replica")
    parser.add_argument("--fault-at", type=float, default=0.65, help="fraction of the run: fail an engine")
    parser.add_argument("--memory-every", type=float, default=15, help="seconds between memory samples")
    parser.add_argument("--settle", type=float, default=10, help="seconds of quiet before the end sample")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed memory growth (fraction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `raylm serve` argument")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # Ray workers
    print("computing greedy references offline...", flush=True)
    probes = build_probes()
    serve_args = SERVE_ARGS + args.serve_arg
    server = SoakServer(serve_args)
    try:
        server.start()
        run = asyncio.run(soak(args, server, probes))
    finally:
        server.stop()

    rows = tally(run["outcomes"])
    start_mb, end_mb = sum(run["start"].values()), sum(run["end"].values())
    growth = (end_mb - start_mb) / start_mb
    info = machine()
    print(f"\nraylm soak: {args.minutes:g} min, {args.concurrency} clients, model {run['model']}, "
          f"raylm serve {' '.join(serve_args)}, on {device_name(info)}")
    print_table(rows)
    print(f"server RSS: {start_mb:.0f} MB at start, {end_mb:.0f} MB at end ({growth:+.1%}); "
          f"replicas idle at the end: {run['idle']}")
    mid = run["timeline"].memory[len(run["timeline"].memory) // 2]["by_role"]
    print_memory(run["start"], mid, run["end"])
    lost_samples = [asdict(o) for o in run["outcomes"] if o.result == "lost"][:30]
    for o in lost_samples[:10]:
        print(f"  lost {o['kind']}: {o['detail']}")
    details = Counter(f"{o.kind}: {o.detail}" for o in run["outcomes"] if o.result == "clean_error")
    tl: Timeline = run["timeline"]
    report = {
        "benchmark": "soak", "minutes": args.minutes, "concurrency": args.concurrency,
        "serve_args": serve_args, "model": run["model"], "max_tokens": MAX_TOKENS,
        "kinds": rows, "lost": lost_samples, "clean_errors": dict(details.most_common()),
        "memory": {"start_mb": round(start_mb, 1), "end_mb": round(end_mb, 1), "growth": round(growth, 4),
                   "start_by_role": run["start"], "end_by_role": run["end"], "timeline": tl.memory},
        "replicas_idle_at_end": run["idle"], "events": tl.events, "warm_up": [asdict(o) for o in run["warm"]],
        "machine": info, "device": device_name(info), "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or RESULTS / f"soak-{slug(device_name(info))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if rows["total"]["lost"] == 0 and run["idle"] and growth <= args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
