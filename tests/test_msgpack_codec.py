"""router/msgpack_codec.py: bounded msgpack bodies, refused with 400/413, never a crash."""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from router.embeds import decode_raw_embeds
from router.msgpack_codec import (MsgpackBodyError, container_budget, decode_msgpack_body,
                                  encode_msgpack_response)

CAP = 1 << 16


def refused(raw: bytes, status: int = 400, cap: int = CAP) -> str:
    with pytest.raises(MsgpackBodyError) as info:
        decode_msgpack_body(raw, cap)
    assert info.value.status == status, str(info.value)
    return str(info.value)


def test_body_with_raw_embeds_round_trips():
    embeds = np.arange(16, dtype=np.float32).reshape(2, 8)
    body = {"model": "m", "prompt": "", "max_tokens": 3,
            "prompt_embeds": {"dtype": "float32", "shape": [2, 8], "data": embeds.tobytes()}}
    decoded = decode_msgpack_body(msgpack.packb(body, use_bin_type=True), CAP)
    assert decoded == body
    assert isinstance(decoded["prompt_embeds"]["data"], bytes)
    out = decode_raw_embeds(decoded["prompt_embeds"], hidden_size=8, max_bytes=CAP)
    np.testing.assert_array_equal(out, embeds)


def test_body_over_cap_is_413():
    raw = msgpack.packb({"prompt": "x" * 100})
    assert "limit" in refused(raw, status=413, cap=50)


@pytest.mark.parametrize("raw, words", [
    (b"", "empty"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb("text"), "must be a map"),
    (msgpack.packb({1: 2}), "not valid msgpack"),
    (msgpack.packb({b"k": 1}, use_bin_type=True), "keys must be strings"),
    (msgpack.packb({"a": msgpack.ExtType(5, b"abc")}), "max_ext_len"),
    (msgpack.packb({"a": msgpack.Timestamp(1)}), "max_ext_len"),
    (msgpack.packb({"a": 1}) + b"\x01", "more than one"),
    (b"\xc1", "FormatError"),
    (b"\x81\xa1a", "incomplete"),
    (b"\x81\xa1a\xa2\xff\xfe", "UTF-8"),
    (b"\x91" * 5000 + b"\x80", "nested too deeply"),
], ids=["empty", "array", "string", "int-key", "bytes-key", "ext", "timestamp", "extra-data",
        "reserved-byte", "truncated", "bad-utf8", "deep-nesting"])
def test_malformed_bodies_are_400(raw, words):
    assert words in refused(raw)


@pytest.mark.parametrize("header", [
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 elements
    b"\xdf\xff\xff\xff\xff",  # map32 of 2**32-1 pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
], ids=["array32", "map32", "bin32", "str32"])
def test_declared_lengths_beyond_the_body_are_refused(header):
    refused(b"\x81\xa1a" + header + b"\x00" * 8)


def test_encode_response_handles_dicts_numpy_and_pydantic():
    from pydantic import BaseModel

    class Choice(BaseModel):
        index: int
        text: str

    packed = encode_msgpack_response({"choices": [Choice(index=0, text="hi")],
                                      "n": np.int64(3), "v": np.array([1.5, 2.5])})
    assert msgpack.unpackb(packed, raw=False) == {
        "choices": [{"index": 0, "text": "hi"}], "n": 3, "v": [1.5, 2.5]}


def test_encode_response_keeps_bytes_binary():
    assert msgpack.unpackb(encode_msgpack_response({"b": b"\x00\xff"}), raw=False) == {
        "b": b"\x00\xff"}


def test_encode_response_refuses_unknown_objects():
    with pytest.raises(TypeError):
        encode_msgpack_response({"x": object()})


# --- a budget of containers and elements per body (issue 10, item 3) ---------------------------

FOUR_MB = 4 * 1024 * 1024


def array32(items: bytes, count: int) -> bytes:
    return b"\xdd" + struct.pack(">I", count) + items


@pytest.mark.parametrize("raw", [
    b"\x81\xa6prompt" + array32(b"\x80" * FOUR_MB, FOUR_MB),               # empty maps
    b"\x81\xa6prompt" + array32(b"\x90" * FOUR_MB, FOUR_MB),               # empty arrays
    b"\x81\xa6prompt" + array32(b"\x91\x80" * (FOUR_MB // 2), FOUR_MB // 2),  # [{}] pairs
    b"\x81\xa6prompt" + array32((b"\x91" * 100 + b"\x90") * (FOUR_MB // 101), FOUR_MB // 101),
], ids=["empty-maps", "empty-arrays", "nested-pairs", "deep-chains"])
def test_a_body_of_containers_is_refused_by_the_budget(raw):
    msg = refused(raw, status=413, cap=256 << 20)
    assert "maps and arrays" in msg


def test_the_budget_counts_containers_anywhere_in_the_body():
    inner = msgpack.packb([[]] * 100)
    body = b"\x82\xa1a" + array32(inner * 50, 50) + b"\xa1b" + array32(inner * 50, 50)
    with pytest.raises(MsgpackBodyError):
        decode_msgpack_body(body, CAP, max_containers=5000)
    assert decode_msgpack_body(body, CAP, max_containers=10_200)["a"][0] == [[]] * 100


def test_elements_budget_and_map_size_cap():
    ints = msgpack.packb({"prompt": [list(range(10))] * 10})
    assert "array items" in refused_with(ints, max_elements=50)
    assert decode_msgpack_body(ints, CAP, max_elements=111)["prompt"][9][9] == 9
    wide = msgpack.packb({f"k{i}": i for i in range(2000)})
    assert "max_map_len" in refused(wide)


def refused_with(raw: bytes, **budget) -> str:
    with pytest.raises(MsgpackBodyError) as info:
        decode_msgpack_body(raw, CAP, **budget)
    assert info.value.status == 413
    return str(info.value)


def test_a_full_request_fits_the_budget_of_its_prompt_count():
    # max_prompts raw embeds entries, each a map with a shape list, plus token-id prompts
    n = 512
    entry = {"dtype": "float32", "shape": [1, 8], "data": bytes(32)}
    body = {"model": "m", "prompt": [[1, 2, 3]] * n, "prompt_embeds": [entry] * n,
            "stop": ["a", "b"], "stop_token_ids": [1], "stream_options": {"include_usage": True}}
    raw = msgpack.packb(body, use_bin_type=True)
    assert decode_msgpack_body(raw, 1 << 20, max_containers=container_budget(2 * n)) == body
    with pytest.raises(MsgpackBodyError):
        decode_msgpack_body(raw, 1 << 20, max_containers=container_budget(n // 2))


def test_error_messages_quote_a_short_prefix():
    raw = msgpack.packb({"a": 1}) + b"\xdb" + struct.pack(">I", 10_000_000) + b"x" * 100
    assert len(refused(raw, cap=1 << 24)) < 300
