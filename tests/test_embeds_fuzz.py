"""Structure-level fuzzing of the embeds decoder and the msgpack codec (hypothesis, seeded).

Not random bit flips: each case changes the zip headers field by field, the archive's record list,
the pickle opcode by opcode, a sparse tensor's parts (indices, lengths, sizes), or a msgpack body's
containers and declared lengths. Whatever comes out, the decoder answers with its own error (400
or 413) or with a tensor that is what torch.save wrote (a sparse one densified as torch densifies
it after checking its invariants); never another exception, never code run, never a result larger
than the cap.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from router.embeds import EmbedsError, decode_raw_embeds, decode_torch_save_bytes
from router.msgpack_codec import MsgpackBodyError, decode_msgpack_body
from sparse_payloads import forged_sparse, torch_dense
from torch_save_layout import Archive, build, pickle_ops, records_of, saved, with_pickle

HIDDEN = 8
CAP = 1 << 16
MARKER = Path("/tmp/raylm-embeds-fuzz-code-ran")


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def decode(raw: bytes):
    """The decoded array, or the EmbedsError; any other exception fails the test."""
    try:
        return decode_torch_save_bytes(raw, hidden_size=HIDDEN, max_bytes=CAP)
    except EmbedsError as err:
        assert err.status in (400, 413), err
        return err


def assert_same_as_torch(out: np.ndarray, raw: bytes) -> None:
    """An accepted payload decodes to what torch.load makes of the same bytes (a sparse one
    checked and densified), within the cap."""
    ref = torch_dense(raw).detach().resolve_neg()
    ref = ref.reshape(out.shape).to(torch.float16 if ref.dtype == torch.float16 else torch.float32)
    np.testing.assert_array_equal(out, ref.numpy())
    assert out.shape[1] == HIDDEN and out.nbytes <= 2 * CAP and np.isfinite(out).all()


@pytest.fixture(scope="module", autouse=True)
def no_code_runs():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a fuzzed pickle ran code"


# --- sources: what torch.save writes for tensors the decoder accepts ---------------------------

def sparse_rows(n: int) -> torch.Tensor:
    return torch.randn(n, HIDDEN) * (torch.arange(n * HIDDEN).reshape(n, HIDDEN) % 3 == 0)


TENSORS = [torch.randn(3, HIDDEN), torch.randn(1, 2, HIDDEN).bfloat16(),
           torch.nn.Parameter(torch.randn(2, HIDDEN)), torch._neg_view(torch.randn(2, HIDDEN)),
           torch.randn(4, 2 * HIDDEN)[:, ::2], torch.randn(2, HIDDEN).half(),
           sparse_rows(3).to_sparse(), sparse_rows(3).bfloat16().to_sparse_csr(),
           sparse_rows(2).half().to_sparse_csc(), sparse_rows(2).unsqueeze(0).to_sparse_csr(),
           sparse_rows(3).to_sparse(sparse_dim=1)]
SOURCES = [(t, records_of(saved(t))) for t in TENSORS]
ARCHIVES = [(t, build(records, torch_layout=layout)) for t, records in SOURCES
            for layout in (True, False)]


def expected(t: torch.Tensor) -> np.ndarray:
    t = t.detach().resolve_neg()
    t = t.to_dense() if t.layout != torch.strided else t
    return t.reshape(-1, HIDDEN).to(torch.float16 if t.dtype == torch.float16 else torch.float32).numpy()


# --- zip headers, field by field ----------------------------------------------------------------

@st.composite
def field_value(draw, bits: int, original: int) -> int:
    top = (1 << bits) - 1
    special = [0, 1, 2, 0x10, 0x14, 0x2D, 0x3F, 0x800, 0x808, 0x809, original - 1, original + 1,
               original + 64, 1 << (bits - 1), (1 << (bits - 1)) - 1, top, top - 1]
    return draw(st.one_of(st.sampled_from(special), st.integers(0, top))) & top


@seed(20261128)
@fuzz_settings(1200)
@given(data=st.data())
def test_zip_header_fields(data):
    t, archive = data.draw(st.sampled_from(ARCHIVES))
    raw = archive.raw
    for _ in range(data.draw(st.integers(1, 3))):
        f = data.draw(st.sampled_from(archive.fields))
        original = struct.unpack_from("<" + f.fmt, raw, f.offset)[0]
        raw = Archive(raw).with_field(f, data.draw(field_value(f.bits, original)))
    out = decode(raw)
    if not isinstance(out, EmbedsError):  # a header change that is accepted changes nothing
        np.testing.assert_array_equal(out, expected(t))


@seed(20261129)
@fuzz_settings(400)
@given(data=st.data())
def test_zip_name_bytes(data):
    t, archive = data.draw(st.sampled_from(ARCHIVES))
    raw = bytearray(archive.raw)
    for _ in range(data.draw(st.integers(1, 2))):
        offset, length = data.draw(st.sampled_from(archive.names))
        i = offset + data.draw(st.integers(0, length - 1))
        raw[i] = data.draw(st.sampled_from([raw[i] ^ 0x20, ord("/"), ord("."), ord("0"), 0, 0x80,
                                            ord("\\"), ord("A"), raw[i] + 1 & 0xFF]))
    out = decode(bytes(raw))
    if not isinstance(out, EmbedsError):
        np.testing.assert_array_equal(out, expected(t))


# --- the archive's records: names, order, duplicates, extras, bytes around it ------------------

EXTRA_NAMES = ["archive/DATA.PKL", "archive/Data.pkl", "archive/x/data.pkl", "archive/data.pkl",
               "archive/data/0", "archive/data/1", "archive/DATA/0", "archive/data/00",
               "archive/version", "archive/VERSION", "archive/.data/version", "other/data.pkl",
               "archive/byteorder", "archive/extra", "data.pkl", "archive/../data.pkl",
               "archive/data/0/", "archive/", "archive//data.pkl", "Archive/data.pkl"]
ALLOWED_BELOW = {"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                 ".data/serialization_id"}


def names_are_torch_save_names(names: list[str], data_records: int) -> bool:
    """An independent statement of the rule the decoder enforces on record names (a dense tensor
    has one data record, a sparse one one per part)."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or len({n.lower() for n in names}) != len(names):
        return False
    below = [n.split("/", 1)[1] if "/" in n else None for n in names]
    data = [b for b in below if b is not None and b.startswith("data/")]
    ok = all(b in ALLOWED_BELOW or (b and b.startswith("data/") and b[5:].isascii()
                                    and b[5:].isdigit()) for b in below)
    return ok and "data.pkl" in below and "version" in below and len(data) == data_records


@st.composite
def record_lists(draw, records: list[tuple[str, bytes]]):
    records = list(records)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "duplicate", "swap", "rename", "add"]))
        i = draw(st.integers(0, len(records) - 1)) if records else 0
        if action == "drop" and records:
            records.pop(i)
        elif action == "duplicate" and records:
            records.insert(draw(st.integers(0, len(records))), records[i])
        elif action == "swap" and records:
            j = draw(st.integers(0, len(records) - 1))
            records[i], records[j] = records[j], records[i]
        elif action == "rename" and records:
            records[i] = (draw(st.sampled_from(EXTRA_NAMES)), records[i][1])
        else:
            data = draw(st.sampled_from([b"", b"3\n", bytes(64), dict(records).get(
                "archive/data.pkl", b"\x80\x02N.")]))
            records.insert(draw(st.integers(0, len(records))), (draw(st.sampled_from(EXTRA_NAMES)), data))
    return records


JUNK = [b"", b"", b"", b"\x00", b"PK\x03\x04", b"PK\x05\x06" + bytes(18),
        saved(torch.ones(2, HIDDEN), _use_new_zipfile_serialization=False), saved(torch.ones(2, HIDDEN))]


@seed(20261130)
@fuzz_settings(500)
@given(data=st.data())
def test_record_lists_and_bytes_around_the_archive(data):
    t, records = data.draw(st.sampled_from(SOURCES))
    changed = data.draw(record_lists(records))
    before, after = data.draw(st.sampled_from(JUNK)), data.draw(st.sampled_from(JUNK))
    raw = before + build(changed, torch_layout=data.draw(st.booleans())).raw + after
    out = decode(raw)
    parts = sum(1 for n, _ in records if "/data/" in n)
    must_refuse = before or after or not names_are_torch_save_names([n for n, _ in changed], parts)
    if must_refuse:
        assert isinstance(out, EmbedsError), [n for n, _ in changed]
    elif not isinstance(out, EmbedsError):
        assert_same_as_torch(out, raw)


# --- the pickle, opcode by opcode ---------------------------------------------------------------

def pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    size = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([size]) + n.to_bytes(size, "little", signed=True)


def pickle_str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


INTS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 255, 256, -1, -2, 2 ** 20, 2 ** 31 - 1, 2 ** 31,
        2 ** 40, 2 ** 62, 2 ** 63 - 1, -2 ** 63, 2 ** 64, 2 ** 100]
STRINGS = ["storage", "0", "1", "00", "cpu", "cuda:0", "neg", "conj", "", "x" * 300, "\u0660",
           "meta", "data/0"]
RUNS_CODE = f"touch {MARKER}"
SNIPPETS = [
    b"}", b"]", b"(", b"N", b")", b"t", b"\x85", b"\x86", b"\x87", b"R", b"Q", b"s", b"u", b"a",
    b"e", b"0", b"1", b"2", b"\x88", b"\x89", b".", b"\x8f", b"\x94", b"\x93", b"\x95" + bytes(8),
    b"q\x07", b"h\x02", b"h\x63", b"r\x00\x01\x00\x00", b"j\x00\x01\x00\x00", b"\x80\x02",
    b"\x80\x05", b"I1\n", b"F1.0\n", b"G" + struct.pack(">d", 1e308), b"S'a'\n", b"Vcpu\n",
    b"\x8c\x03cpu", b"C\x03abc", b"B\x03\x00\x00\x00abc", b"\x8a\xff" + bytes(255), b"\x8b",
    b"ctorch\nFloatStorage\n", b"ctorch\nHalfStorage\n", b"ctorch\nLongStorage\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n", b"cbuiltins\nbytearray\n", b"ctorch._utils\n_rebuild_qtensor\n",
    b"ctorch._utils\n_rebuild_sparse_tensor\n", b"ctorch\nTensor\n", b"ctorch\nSize\n",
    b"cos\nsystem\n(" + pickle_str(RUNS_CODE) + b"tR",
    b"cbuiltins\nexec\n(" + pickle_str(f"open({str(MARKER)!r}, 'w')") + b"tR",
    b"cbuiltins\ngetattr\n", b"ctorch\n_utils\n",
]
FLOOD_OPS = [b"}", b"(", b"N", b"\x8f", b")", b"]", b"\x88"]


def int_op(op: bytes) -> bool:
    return op[:1] in (b"K", b"M", b"J", b"\x8a")


@st.composite
def mutated_ops(draw, ops: list[bytes]) -> list[bytes]:
    ops = list(ops)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(ops) - 1)) if ops else 0
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "int",
                                       "str", "flood", "truncate"]))
        if action == "delete" and ops:
            ops.pop(i)
        elif action == "duplicate" and ops:
            ops.insert(i, ops[i])
        elif action == "swap" and ops:
            j = draw(st.integers(0, len(ops) - 1))
            ops[i], ops[j] = ops[j], ops[i]
        elif action in ("insert", "replace"):
            snippet = draw(st.sampled_from(SNIPPETS))
            if action == "replace" and ops:
                ops[i] = snippet
            else:
                ops.insert(i, snippet)
        elif action == "int":
            targets = [k for k, op in enumerate(ops) if int_op(op)]
            if targets:
                ops[draw(st.sampled_from(targets))] = pickle_int(draw(st.sampled_from(INTS)))
        elif action == "str":
            targets = [k for k, op in enumerate(ops) if op[:1] == b"X"]
            if targets:
                ops[draw(st.sampled_from(targets))] = pickle_str(draw(st.sampled_from(STRINGS)))
        elif action == "flood":
            ops.insert(i, draw(st.sampled_from(FLOOD_OPS)) * draw(st.sampled_from([2, 50, 200, 5000])))
        else:
            ops = ops[:i]
    return ops


@seed(20261201)
@fuzz_settings(1500)
@given(data=st.data())
def test_pickle_opcodes(data):
    _t, records = data.draw(st.sampled_from(SOURCES))
    pkl = dict(records)[next(n for n, _ in records if n.endswith("/data.pkl"))]
    mutated = b"".join(data.draw(mutated_ops(pickle_ops(pkl))))
    raw = build(with_pickle(records, mutated)).raw
    out = decode(raw)
    if not isinstance(out, EmbedsError):
        assert_same_as_torch(out, raw)


# --- sparse parts: indices, lengths and sizes ---------------------------------------------------

INDEX_VALUES = [0, 1, 2, 3, 5, 7, 8, 9, -1, -2, 2 ** 31, 2 ** 62, -2 ** 63]
SPARSE_PARTS = {"coo": lambda t: (t._indices(), t._values()),
                "csr": lambda t: (t.crow_indices(), t.col_indices(), t.values()),
                "csc": lambda t: (t.ccol_indices(), t.row_indices(), t.values())}


def mutate_part(draw, part: torch.Tensor) -> torch.Tensor:
    """One change along a part's last dimension: a value set, an entry dropped, duplicated or
    two swapped."""
    part = part.clone()
    n = part.shape[-1]
    action = draw(st.sampled_from(["set", "drop", "append", "swap"]))
    if action == "set" and n:
        if part.is_floating_point():
            value = draw(st.sampled_from([0.0, -1.5, 1e4, float("nan"), float("inf")]))
        else:
            info = torch.iinfo(part.dtype)
            value = min(max(draw(st.sampled_from(INDEX_VALUES)), info.min), info.max)
        part[..., draw(st.integers(0, n - 1))] = value
    elif action == "drop" and n:
        part = part[..., :-1]
    elif action == "append" and n:
        part = torch.cat([part, part[..., -1:]], dim=-1)
    elif action == "swap" and n > 1:
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        part[..., [i, j]] = part[..., [j, i]]
    return part.contiguous()


@st.composite
def sparse_payloads(draw) -> bytes:
    """A valid sparse tensor as torch makes it, then up to three changes to its parts, its
    index dtype, its coalesced flag or its size."""
    layout = draw(st.sampled_from(list(SPARSE_PARTS)))
    rows, cols = draw(st.integers(1, 5)), draw(st.sampled_from([HIDDEN] * 4 + [3]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    mask = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    dense = (torch.randn(rows, cols) * torch.tensor(mask).reshape(rows, cols)).to(dtype)
    made = {"coo": dense.to_sparse, "csr": dense.to_sparse_csr, "csc": dense.to_sparse_csc}[layout]()
    parts, size = list(SPARSE_PARTS[layout](made)), [rows, cols]
    coalesced = made.is_coalesced() if layout == "coo" else None
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["part", "part", "part", "int32", "coalesced", "size"]))
        if change == "part":
            k = draw(st.integers(0, len(parts) - 1))
            parts[k] = mutate_part(draw, parts[k])
        elif change == "int32":
            parts[:-1] = [p.to(torch.int32) for p in parts[:-1]]
        elif change == "coalesced" and coalesced is not None:
            coalesced = not coalesced
        elif change == "size":
            size[draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1, 2 ** 20]))
    return forged_sparse(layout, tuple(parts), tuple(size), coalesced)


def torch_accepts(raw: bytes) -> torch.Tensor | None:
    try:
        return torch_dense(raw)
    except Exception:  # noqa: BLE001 - torch raises many types for invalid sparse tensors
        return None


@seed(20261204)
@fuzz_settings(600)
@given(raw=sparse_payloads())
def test_sparse_parts(raw):
    out = decode(raw)
    ref = torch_accepts(raw)
    if not isinstance(out, EmbedsError):  # accepted: torch, checking, accepts it and agrees
        assert ref is not None, "raylm densified a sparse tensor torch finds invalid"
        assert_same_as_torch(out, raw)
        return
    # Refused: torch finds it invalid too, or it breaks a rule of raylm's own (a shape other than
    # (seq_len, hidden), more COO entries than positions, non-finite values, the size cap).
    if ref is not None and ref.dim() == 2 and ref.shape[0] > 0 and ref.shape[1] == HIDDEN:
        own_rules = ("entries, more than", "NaN or infinite", "too large")
        assert any(rule in out.message for rule in own_rules), out.message


# --- msgpack raw entries and bodies -------------------------------------------------------------

SCALARS = st.sampled_from([None, True, False, 0, 1, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 0.5,
                           float("nan"), float("inf"), "", "x", "float32", "\u0660", b"",
                           b"\x00" * 8, b"\xff" * 32])
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["a", "b", "prompt", ""]), inner,
                                                 max_size=3)), max_leaves=12)
DIMS = [-1, 0, 1, 2, 3, HIDDEN, HIDDEN + 1, 2 ** 31, 2 ** 62, True, 2.0]
WIRE = [np.full(n, v, np.uint8).tobytes() for n in (0, 16, 32, 48, 64, 96, 128) for v in (0, 0x7F)]


@seed(20261202)
@fuzz_settings(500)
@given(dtype=st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"]),
                       SCALARS),
       shape=st.one_of(st.lists(st.sampled_from(DIMS), max_size=5), VALUES),
       data=st.one_of(st.sampled_from(WIRE), VALUES),
       extra=st.dictionaries(st.sampled_from(["dtype", "extra", ""]), SCALARS, max_size=1))
def test_raw_entries(dtype, shape, data, extra):
    entry = {"dtype": dtype, "shape": shape, "data": data, **extra}
    try:
        out = decode_raw_embeds(entry, hidden_size=HIDDEN, max_bytes=CAP)
    except EmbedsError as err:
        assert err.status in (400, 413) and len(err.message) < 600
        return
    assert out.shape[1] == HIDDEN and np.isfinite(out).all() and out.nbytes <= 2 * CAP


def count_containers(obj) -> int:
    if isinstance(obj, dict):
        return 1 + sum(count_containers(v) for v in obj.values())
    if isinstance(obj, list):
        return 1 + sum(count_containers(v) for v in obj)
    return 0


HEADERS = [b"\x80", b"\x90", b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xde\xff\xff",
           b"\xdf\xff\xff\xff\xff", b"\xc4\xff", b"\xc5\xff\xff", b"\xc6\xff\xff\xff\xff",
           b"\xd9\xff", b"\xdb\xff\xff\xff\xff", b"\xc7\x01\x05", b"\xd4\x05", b"\xc1", b"\x81",
           b"\x9f", b"\x8f", b"\xa1"]
MAX_CONTAINERS = 64


@seed(20261203)
@fuzz_settings(1000)
@given(body=VALUES, data=st.data())
def test_msgpack_bodies(body, data):
    raw = bytearray(msgpack.packb(body, use_bin_type=True))
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["insert", "replace", "cut", "repeat"]))
        header = data.draw(st.sampled_from(HEADERS))
        if action == "insert":
            raw[i:i] = header
        elif action == "replace":
            raw[i:i + len(header)] = header
        elif action == "cut":
            del raw[i:]
        else:
            raw[i:i] = header * data.draw(st.sampled_from([2, 100, 5000]))
    try:
        out = decode_msgpack_body(bytes(raw), 1 << 20, max_containers=MAX_CONTAINERS,
                                  max_elements=4096)
    except MsgpackBodyError as err:
        assert err.status in (400, 413) and len(err.message) < 600
        return
    assert isinstance(out, dict) and all(isinstance(k, str) for k in out)
    assert count_containers(out) <= MAX_CONTAINERS
