"""Issue 10's payload classes over HTTP, against the real Ray Serve app (dummy weights).

Each attack is answered with a 4xx OpenAI error body, never a 500; the Router's peak memory stays
flat (each of these payloads made it allocate a GiB or more before); the app stays healthy and
keeps serving. Timings are printed (`pytest -s`), not asserted.
"""
from __future__ import annotations

import base64
import json
import struct
import time
from types import SimpleNamespace

import msgpack
import psutil
import pytest
import requests
import torch

from serve_utils import free_port, start_ray, start_serve, stop_all, wait_healthy
from sparse_payloads import coo, csr
from torch_save_layout import (build, case_collision, legacy_bytearray_bomb, opcode_flood, records_of,
                               saved)

APP = "embeds-attacks"
HIDDEN = 576  # the embedded default's hidden size (dummy weights of its config)
TIMES: list[tuple[str, int, float, int]] = []


@pytest.fixture(scope="module")
def server():
    tmp = start_ray("attacks", num_cpus=2, object_store_mb=100)
    try:
        from cluster.app import run

        port = free_port()
        start_serve(port)
        run({"name": APP, "route_prefix": "/", "router_num_cpus": 0.1,
             "ray_actor_options": {"num_cpus": 0.5},
             "engine": {"load_format": "dummy", "max_model_len": 256}})
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield SimpleNamespace(base=base, router=router_process())
    finally:
        stop_all(tmp)
        print_times()


def router_process() -> psutil.Process:
    """This module's Router replica (its process title names the app)."""
    tag = f"ServeReplica:{APP}:Router"
    found = [p for p in psutil.process_iter(["cmdline"]) if any(tag in c for c in p.info["cmdline"] or ())]
    assert len(found) == 1, found
    return found[0]


def peak_rss_mb(proc: psutil.Process) -> int:
    with open(f"/proc/{proc.pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


def post(server, name: str, body: bytes, ctype: str = "application/json") -> requests.Response:
    t0 = time.perf_counter()
    r = requests.post(f"{server.base}/v1/completions", data=body, headers={"Content-Type": ctype},
                      timeout=120)
    TIMES.append((name, len(body), time.perf_counter() - t0, r.status_code))
    return r


def print_times() -> None:
    print("\nattack                              body bytes   seconds  status")
    for name, size, seconds, status in TIMES:
        print(f"{name:36s}{size:11d}{seconds:10.3f}{status:8d}")


def embeds_body(raw: bytes, **extra) -> bytes:
    return json.dumps({"prompt": "", "max_tokens": 2, "temperature": 0.0,
                       "prompt_embeds": base64.b64encode(raw).decode(), **extra}).encode()


def refused(r: requests.Response, status: int = 400) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


GOOD = torch.randn(3, HIDDEN)
GOOD_RAW = saved(GOOD)
GOOD_PKL = dict(records_of(GOOD_RAW))["archive/data.pkl"]
NEG_PKL = dict(records_of(saved(torch._neg_view(GOOD))))["archive/data.pkl"]


def with_field(label: str, value: int) -> bytes:
    archive = build(records_of(GOOD_RAW))
    return archive.with_field(next(f for f in archive.fields if f.label == label), value)


ARCHIVE_ATTACKS = {
    "legacy bytearray(1 GiB) + archive": legacy_bytearray_bomb() + GOOD_RAW,
    "case collision DATA.PKL": case_collision(GOOD_RAW, dict(records_of(saved(GOOD[:1])))["archive/data.pkl"]),
    "300K EMPTY_DICT then a tensor": opcode_flood(GOOD_RAW, b"}", 300_000),
    "3000 MARK then a tensor": opcode_flood(GOOD_RAW, b"(", 3000),
    "forged conj bit": build([(n, NEG_PKL.replace(b"X\x03\x00\x00\x00neg", b"X\x04\x00\x00\x00conj")
                               if n.endswith("data.pkl") else d)
                              for n, d in records_of(saved(torch._neg_view(GOOD)))]).raw,
    "encrypted record": with_field("central[0].flags", 0x0809),
    "unknown compression method": with_field("central[0].method", 99),
    "unknown zip version": with_field("central[0].version", 0xFFFF),
    "zip64 offset, high bit set": with_field("zip64_end.cd_offset", 1 << 63),
    "record offset, high bit set": with_field("central[4].offset", 0x80000000),
}


def test_archive_attacks_are_400s_without_memory_growth(server):
    assert post(server, "valid torch.save (warm-up)", embeds_body(GOOD_RAW)).status_code == 200
    before = peak_rss_mb(server.router)
    for name, payload in ARCHIVE_ATTACKS.items():
        refused(post(server, name, embeds_body(payload)))
    grown = peak_rss_mb(server.router) - before
    assert grown < 256, f"the Router's peak memory grew by {grown} MB"


def test_negative_bit_tensor_is_served_as_its_resolved_values(server):
    neg = post(server, "neg-bit tensor", embeds_body(saved(torch._neg_view(GOOD)), max_tokens=4))
    plain = post(server, "its resolved twin", embeds_body(saved(-GOOD), max_tokens=4))
    assert neg.status_code == plain.status_code == 200, neg.text[:300]
    assert neg.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


SPARSE_ATTACKS = {  # CVE-2025-62164's class: sparse tensors torch would densify out of bounds
    "COO index far out of range": (coo([[0, 2**40], [0, 1]], [1.0, 2.0], (3, HIDDEN)), 400),
    "COO negative index": (coo([[0, -2**63], [0, 1]], [1.0, 2.0], (3, HIDDEN)), 400),
    "CSR row pointers past nnz": (csr([0, 1, 2, 2**40], [0, 1], [1.0, 2.0], (3, HIDDEN)), 400),
    "CSR column out of range": (csr([0, 1, 2, 2], [0, 2**40], [1.0, 2.0], (3, HIDDEN)), 400),
    "COO 1M entries, zero strides": (coo(torch.zeros(1, dtype=torch.int64).expand(2, 10**6),
                                         torch.zeros(1).expand(10**6), (3, HIDDEN)), 413),
    "COO of shape (2**28, hidden)": (coo([[0], [0]], [1.0], (2**28, HIDDEN)), 413),
}


def test_sparse_attacks_are_refused_without_memory_growth(server):
    before = peak_rss_mb(server.router)
    for name, (payload, status) in SPARSE_ATTACKS.items():
        refused(post(server, name, embeds_body(payload)), status)
    grown = peak_rss_mb(server.router) - before
    assert grown < 256, f"the Router's peak memory grew by {grown} MB"
    dense = post(server, "dense twin", embeds_body(saved(GOOD), max_tokens=4))
    sparse = post(server, "valid CSR", embeds_body(saved(GOOD.to_sparse_csr()), max_tokens=4))
    assert dense.status_code == sparse.status_code == 200, sparse.text[:300]
    assert sparse.json()["choices"][0]["text"] == dense.json()["choices"][0]["text"]


FOUR_MB = 4 * 1024 * 1024


def msgpack_prompt(items: bytes, count: int) -> bytes:
    return b"\x82\xa6prompt\xa0\xadprompt_embeds\xdd" + struct.pack(">I", count) + items


def test_msgpack_container_floods_are_refused_fast(server):
    before = peak_rss_mb(server.router)
    for name, body in {"msgpack: 4 MB of empty maps": msgpack_prompt(b"\x80" * FOUR_MB, FOUR_MB),
                       "msgpack: 4 MB of empty arrays": msgpack_prompt(b"\x90" * FOUR_MB, FOUR_MB)}.items():
        assert "maps and arrays" in refused(post(server, name, body, "application/msgpack"), 413)
    grown = peak_rss_mb(server.router) - before
    assert grown < 256, f"the Router's peak memory grew by {grown} MB"
    entry = {"dtype": "float32", "shape": [2, HIDDEN], "data": torch.randn(2, HIDDEN).numpy().tobytes()}
    ok = post(server, "msgpack raw embeds (valid)",
              msgpack.packb({"prompt": "", "max_tokens": 2, "prompt_embeds": [entry] * 4}, use_bin_type=True),
              "application/msgpack")
    assert ok.status_code == 200, ok.text[:300]


TEN_MB = "x" * 10_000_000


@pytest.mark.parametrize("name, body, ctype, status", [
    ("msgpack: 10 MB dtype", msgpack.packb({"prompt": "", "prompt_embeds": {
        "dtype": TEN_MB, "shape": [2, HIDDEN], "data": b""}}, use_bin_type=True), "application/msgpack", 400),
    ("msgpack: shape of 1M dims", msgpack.packb({"prompt": "", "prompt_embeds": {
        "dtype": "float32", "shape": [7] * 1_000_000, "data": b""}}, use_bin_type=True), "application/msgpack", 400),
    ("json: 10 MB model name", json.dumps({"model": TEN_MB, "prompt": "hi"}).encode(), "application/json", 404),
    ("json: 10 MB logit_bias key", json.dumps({"prompt": "hi", "logit_bias": {TEN_MB: "x"}}).encode(),
     "application/json", 400),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_errors_quote_a_short_prefix_of_what_was_sent(server, name, body, ctype, status):
    message = refused(post(server, name, body, ctype), status)
    assert len(message) < 400, message[:500]


def test_the_app_is_healthy_after_the_attacks(server):
    assert requests.get(f"{server.base}/health", timeout=30).status_code == 200
    assert post(server, "valid torch.save (after)", embeds_body(GOOD_RAW)).status_code == 200
