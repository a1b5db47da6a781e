"""router/embeds.py: untrusted prompt embeds are decoded safely, once, into numpy arrays."""
from __future__ import annotations

import base64
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from router.embeds import (
    EmbedsError,
    decode_base64_embeds,
    decode_embeds_entry,
    decode_raw_embeds,
    decode_torch_save_bytes,
)
from sparse_payloads import coo, csc, csr, forged_sparse, torch_dense
from torch_save_layout import (Archive, build, case_collision, legacy_bytearray_bomb, opcode_flood,
                               records_of, saved, with_pickle)

HIDDEN = 8
CAP = 1 << 20  # 1 MiB of tensor data


def b64_of(obj, **save_kwargs) -> str:
    return base64.b64encode(saved(obj, **save_kwargs)).decode()


def decode(b64: str, max_bytes: int = CAP) -> np.ndarray:
    return decode_base64_embeds(b64, hidden_size=HIDDEN, max_bytes=max_bytes)


def refused(b64: str, status: int = 400, max_bytes: int = CAP) -> str:
    with pytest.raises(EmbedsError) as info:
        decode(b64, max_bytes)
    assert info.value.status == status, str(info.value)
    return str(info.value)


# --- hand-made torch.save archives, for payloads torch.save would never write -------------------

def archive(pickle_bytes: bytes, records: dict[str, bytes] | None = None,
            compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def rewrite_pickle(raw: bytes, old: bytes, new: bytes) -> bytes:
    """A torch.save archive whose data.pkl has `old` replaced by `new`."""
    source, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            z.writestr(info.filename, data)
    return out.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pickle_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pickle_int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes(9, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


# --- valid tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_float32_bfloat16_float64_become_float32(dtype):
    t = torch.randn(5, HIDDEN).to(dtype)
    out = decode(b64_of(t))
    assert out.dtype == np.float32 and out.shape == (5, HIDDEN)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, t.to(torch.float32).numpy())


def test_float16_stays_float16():
    t = torch.randn(4, HIDDEN).to(torch.float16)
    out = decode(b64_of(t))
    assert out.dtype == np.float16 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, t.numpy())


def test_rank3_with_leading_one_is_squeezed():
    t = torch.randn(1, 6, HIDDEN)
    out = decode(b64_of(t))
    assert out.shape == (6, HIDDEN)
    np.testing.assert_array_equal(out, t[0].numpy())


def test_embedding_layer_output_with_grad_is_accepted():
    """What the spec's clients send: embedding_layer(token_ids).squeeze(0), grad attached."""
    layer = torch.nn.Embedding(32, HIDDEN)
    t = layer(torch.tensor([[3, 1, 4, 1, 5]])).squeeze(0)
    assert t.requires_grad
    np.testing.assert_array_equal(decode(b64_of(t)), t.detach().numpy())


def test_noncontiguous_view_of_larger_storage_is_copied_compactly():
    base = torch.randn(10, 2 * HIDDEN)
    view = base[2:5, ::2]
    out = decode(b64_of(view))
    np.testing.assert_array_equal(out, view.numpy())
    assert out.flags.c_contiguous and out.nbytes == 3 * HIDDEN * 4


def test_decode_embeds_entry_dispatches_on_wire_form():
    t = torch.randn(2, HIDDEN)
    raw = saved(t)
    kw = dict(hidden_size=HIDDEN, max_bytes=CAP)
    np.testing.assert_array_equal(decode_embeds_entry(b64(raw), **kw), t.numpy())
    np.testing.assert_array_equal(decode_embeds_entry(raw, **kw), t.numpy())
    entry = {"dtype": "float32", "shape": [2, HIDDEN], "data": t.numpy().tobytes()}
    np.testing.assert_array_equal(decode_embeds_entry(entry, **kw), t.numpy())
    with pytest.raises(EmbedsError) as info:
        decode_embeds_entry(12, **kw)
    assert info.value.status == 400


# --- shape, dtype and value errors --------------------------------------------------------------

def test_wrong_hidden_size_names_expected_shape():
    msg = refused(b64_of(torch.randn(3, HIDDEN + 1)))
    assert f"(seq_len, {HIDDEN})" in msg and f"(3, {HIDDEN + 1})" in msg


@pytest.mark.parametrize("shape", [(HIDDEN,), (1, 1, 3, HIDDEN), (2, 3, HIDDEN)])
def test_rank1_rank4_and_batched_rank3_are_refused(shape):
    msg = refused(b64_of(torch.randn(*shape)))
    assert "(seq_len, hidden_size)" in msg and str(shape) in msg


def test_empty_sequence_is_refused():
    assert "empty" in refused(b64_of(torch.zeros(0, HIDDEN)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
def test_integer_bool_and_complex_dtypes_are_refused(dtype):
    msg = refused(b64_of(torch.zeros(3, HIDDEN, dtype=dtype)))
    assert "float32, bfloat16, float16 or float64" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(value):
    t = torch.randn(3, HIDDEN)
    t[1, 2] = value
    assert "NaN or infinite" in refused(b64_of(t))


def test_float64_overflowing_float32_is_refused():
    assert "NaN or infinite" in refused(b64_of(torch.full((2, HIDDEN), 1e300, dtype=torch.float64)))


# --- sparse tensors: accepted as vLLM accepts them, checked before they are densified -----------

SPARSE_LAYOUTS = {"coo": lambda t: t.to_sparse(), "csr": lambda t: t.to_sparse_csr(),
                  "csc": lambda t: t.to_sparse_csc()}


def sparse_source(seq_len: int = 5) -> torch.Tensor:
    t = torch.randn(seq_len, HIDDEN)
    return t * (torch.rand(seq_len, HIDDEN) < 0.4)  # mostly zeros, as a client would sparsify


def dense_as_decoded(t: torch.Tensor) -> np.ndarray:
    t = t.to_dense() if t.layout != torch.strided else t
    t = t.reshape(-1, HIDDEN)
    return (t if t.dtype == torch.float16 else t.to(torch.float32)).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", SPARSE_LAYOUTS)
@pytest.mark.parametrize("seq_len", [1, 2, 10])
def test_sparse_layouts_decode_to_their_dense_form(layout, dtype, seq_len):
    t = SPARSE_LAYOUTS[layout](sparse_source(seq_len).to(dtype))
    out = decode(b64_of(t))
    assert out.dtype == (np.float16 if dtype == torch.float16 else np.float32)
    assert out.flags.c_contiguous and out.shape == (seq_len, HIDDEN)
    np.testing.assert_array_equal(out, dense_as_decoded(t))


@pytest.mark.parametrize("make", [
    lambda t: t.to_sparse(sparse_dim=1),                # hybrid COO: values are whole rows
    lambda t: t.unsqueeze(0).to_sparse(),               # (1, seq_len, hidden) COO
    lambda t: t.unsqueeze(0).to_sparse_csr(),           # batched CSR
    lambda t: t.unsqueeze(0).to_sparse_csc(),           # batched CSC
    lambda t: t.unsqueeze(0).to_sparse(sparse_dim=2),   # COO over (1, seq_len), dense rows
    lambda t: torch.zeros_like(t).to_sparse(),          # no entries at all
    lambda t: torch.zeros_like(t).to_sparse_csr(),
    lambda t: t.to_sparse().coalesce(),
], ids=["coo-hybrid", "coo-rank3", "csr-batched", "csc-batched", "coo-rank3-hybrid", "coo-empty",
        "csr-empty", "coo-coalesced"])
def test_other_sparse_forms_torch_writes_decode_too(make):
    t = make(sparse_source())
    np.testing.assert_array_equal(decode(b64_of(t)), dense_as_decoded(t))


def test_sparse_is_never_unpickled_by_torch(monkeypatch):
    raw = saved(sparse_source().to_sparse_csr())

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran on a sparse payload")

    monkeypatch.setattr(torch, "load", no_load)
    decode(b64(raw))


def test_uncoalesced_coo_duplicates_sum_as_torch_does():
    raw = coo([[1, 3, 1, 0], [2, 0, 2, 7]], [1.5, 2.0, -4.0, 8.0], (4, HIDDEN))
    out = decode(b64(raw))
    assert out[1, 2] == -2.5 and out[3, 0] == 2.0 and out[0, 7] == 8.0
    np.testing.assert_array_equal(out, torch_dense(raw).numpy())


def test_unsorted_coo_indices_are_accepted():
    raw = coo([[3, 0, 2], [1, 5, 4]], [1.0, 2.0, 3.0], (4, HIDDEN))
    np.testing.assert_array_equal(decode(b64(raw)), torch_dense(raw).numpy())


def test_neg_bit_on_sparse_values_is_resolved():
    values = torch._neg_view(torch.tensor([1.0, -2.0]))
    raw = forged_sparse("coo", (torch.tensor([[0, 1], [3, 4]]), values), (2, HIDDEN), False)
    out = decode(b64(raw))
    assert out[0, 3] == -1.0 and out[1, 4] == 2.0


@pytest.mark.parametrize("make", [lambda t: t.to_sparse_bsr((2, 2)), lambda t: t.to_sparse_bsc((2, 2))],
                         ids=["bsr", "bsc"])
def test_block_sparse_layouts_are_refused(make):
    assert "COO, CSR or CSC" in refused(b64_of(make(sparse_source(4))))


def test_huge_sparse_shape_is_413_before_densifying():
    # Dense it would be 2**24 x 8 float32 = 512 MiB; sparse it is a few hundred bytes. The refusal
    # comes from the declared shape, before anything of that size is allocated.
    indices = torch.tensor([[0, 2**24 - 1], [0, HIDDEN - 1]])
    t = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0]), (2**24, HIDDEN))
    payload = b64_of(t)
    assert len(payload) < 4096
    assert "dense form" in refused(payload, status=413)


def test_sparse_dense_size_uses_the_same_cap_as_dense_input():
    t = torch.zeros(8, HIDDEN)  # 8 x 8 float32: 256 bytes dense, its sparse parts far fewer
    t[2, 3], t[7, 0] = 1.0, -2.0
    for layout, make in SPARSE_LAYOUTS.items():
        refused(b64_of(make(t)), status=413, max_bytes=255)
        decode(b64_of(make(t)), max_bytes=256)
    refused(b64_of(t), status=413, max_bytes=255)


def test_integer_and_complex_sparse_tensors_are_refused():
    t = torch.zeros(3, HIDDEN, dtype=torch.int64)
    t[1, 1] = 4
    assert "float32, bfloat16, float16 or float64" in refused(b64_of(t.to_sparse()))
    assert "float32, bfloat16" in refused(b64_of(torch.randn(3, HIDDEN, dtype=torch.complex64).to_sparse()))


def test_zero_stride_index_view_declaring_megabytes_is_413():
    indices = torch.zeros(1, dtype=torch.int64).expand(2, 10**6)  # 16 MB declared, 8 bytes sent
    raw = coo(indices, torch.zeros(1).expand(10**6), (4, HIDDEN))
    assert len(raw) < 4096
    assert "declared tensor" in refused(b64(raw), status=413)


def test_sparse_with_wrong_hidden_size_names_expected_shape():
    msg = refused(b64_of(torch.randn(3, HIDDEN + 1).to_sparse_csr()))
    assert f"(seq_len, {HIDDEN})" in msg


# Hostile sparse tensors: each was writable by torch.save; each must be a 400 before any dense
# tensor exists. (torch itself densifies most of them out of bounds without its invariant check.)
HOSTILE_SPARSE = {
    "coo-row-out-of-range": coo([[0, 4], [0, 1]], [1.0, 2.0], (4, HIDDEN)),
    "coo-col-out-of-range": coo([[0, 1], [0, HIDDEN]], [1.0, 2.0], (4, HIDDEN)),
    "coo-far-out-of-range": coo([[0, 2**40], [0, 1]], [1.0, 2.0], (4, HIDDEN)),
    "coo-negative": coo([[0, -1], [0, 1]], [1.0, 2.0], (4, HIDDEN)),
    "coo-most-negative": coo([[0, -2**63], [0, 1]], [1.0, 2.0], (4, HIDDEN)),
    "coo-more-indices-than-values": coo([[0, 1, 2], [0, 1, 2]], [1.0, 2.0], (4, HIDDEN)),
    "coo-more-values-than-indices": coo([[0, 1], [0, 1]], [1.0, 2.0, 3.0], (4, HIDDEN)),
    "coo-nnz-beyond-dense-size": coo(torch.zeros(2, 1000, dtype=torch.int64), torch.ones(1000),
                                     (4, HIDDEN)),
    "coo-index-rank-1": coo([0, 1], [1.0, 2.0], (4, HIDDEN)),
    "coo-too-many-sparse-dims": coo([[0], [0], [0]], [1.0], (4, HIDDEN)),
    "coo-values-wrong-dense-dims": forged_sparse("coo", (torch.tensor([[0, 1]]), torch.ones(2, 3)),
                                                 (4, HIDDEN)),
    "coo-float-indices": forged_sparse("coo", (torch.tensor([[0.0], [1.0]]), torch.ones(1)),
                                       (4, HIDDEN)),
    "coo-int32-values": coo([[0], [1]], torch.ones(1, dtype=torch.int32), (4, HIDDEN)),
    "csr-crow-not-from-0": csr([1, 1, 2, 2, 2], [0, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-crow-decreasing": csr([0, 2, 1, 2, 2], [0, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-crow-not-ending-at-nnz": csr([0, 1, 1, 1, 1], [0, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-crow-past-nnz": csr([0, 1, 2, 3, 9], [0, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-crow-too-short": csr([0, 2], [0, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-col-out-of-range": csr([0, 1, 2, 2, 2], [0, HIDDEN], [1.0, 2.0], (4, HIDDEN)),
    "csr-col-negative": csr([0, 1, 2, 2, 2], [0, -3], [1.0, 2.0], (4, HIDDEN)),
    "csr-col-unsorted": csr([0, 2, 2, 2, 2], [5, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-col-duplicate": csr([0, 2, 2, 2, 2], [3, 3], [1.0, 2.0], (4, HIDDEN)),
    "csr-more-values-than-cols": csr([0, 1, 2, 2, 2], [0, 1], [1.0, 2.0, 3.0], (4, HIDDEN)),
    "csr-index-dtypes-differ": csr([0, 1, 2, 2, 2], torch.tensor([0, 1], dtype=torch.int32),
                                   [1.0, 2.0], (4, HIDDEN)),
    "csr-batch-mismatch": csr([[0, 1, 1, 1, 1]], [0], [1.0], (1, 4, HIDDEN)),
    "csc-row-out-of-range": csc([0, 1, 1, 1, 1, 1, 1, 1, 1], [4], [1.0], (4, HIDDEN)),
    "csc-ccol-not-ending-at-nnz": csc([0, 1, 1, 1, 1, 1, 1, 1, 0], [0], [1.0], (4, HIDDEN)),
    "csc-row-duplicate": csc([0, 2, 2, 2, 2, 2, 2, 2, 2], [1, 1], [1.0, 2.0], (4, HIDDEN)),
    "csr-negative-size": csr([0, 0], torch.zeros(0, dtype=torch.int64), torch.zeros(0), (1, -HIDDEN)),
    "coo-falsely-coalesced": coo([[1, 0], [0, 0]], [1.0, 2.0], (4, HIDDEN), coalesced=True),
    "coo-falsely-coalesced-duplicate": coo([[2, 2], [5, 5]], [1.0, 2.0], (4, HIDDEN),
                                           coalesced=True),
    "coo-zero-stride-indices": coo(torch.zeros(1, dtype=torch.int64).expand(2, 1000),
                                   torch.zeros(1).expand(1000), (4, HIDDEN)),
    "csr-with-coalesced-flag": forged_sparse(
        "csr", (torch.tensor([0, 0]), torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
        (1, HIDDEN), coalesced=True),
}


@pytest.mark.parametrize("payload", HOSTILE_SPARSE.values(), ids=HOSTILE_SPARSE.keys())
def test_hostile_sparse_tensors_are_refused_before_densifying(payload, monkeypatch):
    calls = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: calls.append(a) or real_zeros(*a, **k))
    msg = refused(b64(payload))
    assert not calls, f"a dense tensor was allocated for a refused payload: {msg}"
    assert len(msg) < 600


def test_hostile_sparse_refusals_agree_with_torchs_invariant_check():
    """Each hostile payload is one torch refuses too when it checks (nnz beyond the positions
    aside: torch sums such duplicates, raylm refuses them)."""
    for name, payload in HOSTILE_SPARSE.items():
        if name in ("coo-nnz-beyond-dense-size", "coo-int32-values", "csr-negative-size",
                    "coo-float-indices", "csr-with-coalesced-flag",
                    "coo-zero-stride-indices"):
            continue
        with pytest.raises(Exception):
            torch_dense(payload)
        assert name


def test_quantized_and_nested_tensors_are_refused():
    q = torch.quantize_per_tensor(torch.zeros(3, HIDDEN), 0.1, 0, torch.qint8)
    assert "quantized" in refused(b64_of(q))
    nested = torch.nested.nested_tensor([torch.zeros(3, HIDDEN), torch.zeros(2, HIDDEN)])
    assert "nested" in refused(b64_of(nested))


@pytest.mark.parametrize("obj", [{"prompt_embeds": torch.zeros(3, HIDDEN)}, [torch.zeros(3, HIDDEN)],
                                 (torch.zeros(3, HIDDEN),), 42, "text"],
                         ids=["dict", "list", "tuple", "int", "str"])
def test_containers_and_non_tensors_are_refused(obj):
    assert "must be a torch.Tensor" in refused(b64_of(obj))


# --- payloads that try to run code --------------------------------------------------------------

class WritesMarker:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecsMarker:
    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload_class", [WritesMarker, ExecsMarker])
def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, payload_class):
    marker = tmp_path / "code-ran"
    payload_class.marker = str(marker)
    in_archive = b64_of({"x": payload_class()})  # a torch.save archive carrying the object
    bare = b64(pickle.dumps(payload_class()))   # a bare pickle, not an archive at all
    legacy = b64_of(payload_class(), _use_new_zipfile_serialization=False)
    for payload in (in_archive, bare, legacy):
        refused(payload)
        assert not marker.exists()
    # The payloads are live: unpickling the bare one without our guard would run the code.
    pickle.loads(base64.b64decode(bare))
    assert marker.exists()


def test_pickle_with_stack_global_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    WritesMarker.marker = str(marker)
    refused(b64(archive(pickle.dumps(WritesMarker(), protocol=4))))
    assert not marker.exists()


# --- size caps, checked before anything large is allocated --------------------------------------

def test_base64_text_over_cap_is_413_before_decoding():
    # Not even valid base64: a 413 proves the length was checked before decoding.
    msg = refused("!" * (8 * CAP), status=413)
    assert "base64" in msg


def test_real_tensor_over_cap_is_413():
    t = torch.zeros(CAP // (4 * HIDDEN) + 1, HIDDEN)
    refused(b64_of(t), status=413)
    assert decode(b64_of(t), max_bytes=2 * CAP).shape == t.shape


def test_zip_bomb_record_is_refused_from_its_header():
    # A deflated record: 64 MiB of zeros in about 64 KiB. torch.save never compresses: the
    # record is refused from its directory entry before anything is inflated.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02.")
        with z.open("archive/data/0", "w", force_zip64=True) as record:
            chunk = bytes(1 << 20)
            for _ in range(64):
                record.write(chunk)
    payload = out.getvalue()
    assert len(payload) < 1 << 20
    assert "compressed" in refused(b64(payload))


def test_zero_stride_tensor_declaring_a_terabyte_is_413_without_allocating():
    # torch.load happily rebuilds a (2**20, 2**20) float32 view over a 64-byte storage with
    # zero strides; making it contiguous would allocate 4 TiB. The declared shape is refused.
    raw = saved(torch.zeros(2, HIDDEN))
    size_stride = b"K\x00K\x02K\x08\x86q\x06K\x08K\x01\x86"  # offset 0, size (2, 8), stride (8, 1)
    huge = b"K\x00" + pickle_int(2**20) + pickle_int(2**20) + b"\x86q\x06K\x00K\x00\x86"
    payload = b64(rewrite_pickle(raw, size_stride, huge))
    assert len(payload) < 4096
    msg = refused(payload, status=413)
    assert "(1048576, 1048576)" in msg


def test_storage_numel_larger_than_its_record_is_refused():
    # The pickle claims a 2**30-element storage for a 64-byte record.
    raw = saved(torch.zeros(2, HIDDEN))
    numel = b"X\x03\x00\x00\x00cpuq\x04K\x10t"
    assert "storage of 1073741824 elements" in refused(b64(rewrite_pickle(
        raw, numel, b"X\x03\x00\x00\x00cpuq\x04J\x00\x00\x00\x40t")))


def test_bytearray_allocation_bomb_is_refused_before_loading():
    # weights_only=True allows builtins.bytearray: this 300-byte pickle would make torch.load
    # allocate (and zero) 1 TiB. It is refused by the allow-list scan before torch.load runs.
    p = b"\x80\x02cbuiltins\nbytearray\n(" + pickle_int(2**40) + b"tR."
    assert "builtins.bytearray" in refused(b64(archive(p)))


def test_quantized_allocation_bomb_is_refused_before_loading():
    # _rebuild_qtensor allocates its declared size before attaching the (tiny) storage.
    p = (b"\x80\x02ctorch._utils\n_rebuild_qtensor\n(("
         + pickle_str("storage") + b"ctorch\nQInt8Storage\n" + pickle_str("0") + pickle_str("cpu")
         + pickle_int(4) + b"tQ" + pickle_int(0)
         + b"(" + pickle_int(2**40) + pickle_int(HIDDEN) + b"t(" + pickle_int(0) + pickle_int(0)
         + b"t(ctorch\nper_tensor_affine\nG" + struct.pack(">d", 1.0) + pickle_int(0) + b"t"
         + b"\x89ccollections\nOrderedDict\n)RtR.")
    payload = b64(archive(p, {"0": bytes(4)}))
    assert "quantized" in refused(payload)


# --- garbage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    "not base64 at all!",
    "QUJD",                                   # valid base64 of b"ABC": not a zip
    b64(b"PK\x03\x04" + bytes(100)),          # a zip signature and nothing else
    b64(archive(b"\x80\x02garbage")),         # a zip whose pickle is garbage
    b64(archive(b"")),                        # an empty pickle
    "",
], ids=["not-base64", "not-zip", "zip-signature", "bad-pickle", "empty-pickle", "empty"])
def test_garbage_is_a_400(payload):
    refused(payload)


def test_non_string_payload_is_a_400():
    with pytest.raises(EmbedsError) as info:
        decode_base64_embeds(123, hidden_size=HIDDEN, max_bytes=CAP)
    assert info.value.status == 400


def test_torch_save_bytes_over_cap_are_413():
    raw = saved(torch.zeros(4, HIDDEN))
    with pytest.raises(EmbedsError) as info:
        decode_torch_save_bytes(raw + bytes(200_000), hidden_size=HIDDEN, max_bytes=1024)
    assert info.value.status == 413


# --- msgpack raw entries ------------------------------------------------------------------------

def raw_entry(array: np.ndarray, dtype: str) -> dict:
    return {"dtype": dtype, "shape": list(array.shape), "data": array.tobytes()}


def decode_raw(entry, max_bytes: int = CAP) -> np.ndarray:
    return decode_raw_embeds(entry, hidden_size=HIDDEN, max_bytes=max_bytes)


def test_raw_float32_round_trips():
    a = np.random.default_rng(0).standard_normal((5, HIDDEN)).astype(np.float32)
    out = decode_raw(raw_entry(a, "float32"))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


def test_raw_float16_stays_float16():
    a = np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float16)
    out = decode_raw(raw_entry(a, "float16"))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, a)


def test_raw_bfloat16_becomes_exact_float32():
    t = torch.randn(4, HIDDEN).to(torch.bfloat16)
    entry = {"dtype": "bfloat16", "shape": [4, HIDDEN],
             "data": t.view(torch.uint16).numpy().tobytes()}
    out = decode_raw(entry)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, t.to(torch.float32).numpy())


def test_raw_bfloat16_known_bits():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x3E80] * 2, dtype="<u2")  # 1, -2, 0, 0.25
    out = decode_raw({"dtype": "bfloat16", "shape": [1, HIDDEN], "data": bits.tobytes()})
    np.testing.assert_array_equal(out[0], [1.0, -2.0, 0.0, 0.25] * 2)


def test_raw_rank3_is_squeezed():
    a = np.ones((1, 2, HIDDEN), dtype=np.float32)
    assert decode_raw(raw_entry(a, "float32")).shape == (2, HIDDEN)


def test_raw_over_cap_is_413_from_the_shape_alone():
    # A few bytes of data declaring a 2**40-row tensor: refused from the shape, nothing allocated.
    entry = {"dtype": "float32", "shape": [2**40, HIDDEN], "data": b"\0" * 32}
    with pytest.raises(EmbedsError) as info:
        decode_raw(entry)
    assert info.value.status == 413


GOOD = {"dtype": "float32", "shape": [2, HIDDEN], "data": bytes(2 * HIDDEN * 4)}


@pytest.mark.parametrize("entry, words", [
    ("not a map", "must be a map"),
    ([1, 2], "must be a map"),
    ({k: v for k, v in GOOD.items() if k != "data"}, "missing ['data']"),
    ({k: v for k, v in GOOD.items() if k != "shape"}, "missing ['shape']"),
    ({k: v for k, v in GOOD.items() if k != "dtype"}, "missing ['dtype']"),
    ({**GOOD, "extra": 1}, "unexpected ['extra']"),
    ({**GOOD, "dtype": "float64"}, "dtype must be one of"),
    ({**GOOD, "dtype": "int32"}, "dtype must be one of"),
    ({**GOOD, "dtype": b"float32"}, "dtype must be one of"),
    ({**GOOD, "dtype": None}, "dtype must be one of"),
    ({**GOOD, "shape": "2,8"}, "list of integers"),
    ({**GOOD, "shape": []}, "list of integers"),
    ({**GOOD, "shape": [2.0, HIDDEN]}, "list of integers"),
    ({**GOOD, "shape": [True, HIDDEN]}, "list of integers"),
    ({**GOOD, "shape": [None, HIDDEN]}, "list of integers"),
    ({**GOOD, "shape": [0, HIDDEN], "data": b""}, "must be > 0"),
    ({**GOOD, "shape": [-2, HIDDEN]}, "must be > 0"),
    ({**GOOD, "shape": [2 * HIDDEN]}, "(seq_len, hidden_size)"),
    ({**GOOD, "shape": [1, 1, 2, HIDDEN]}, "(seq_len, hidden_size)"),
    ({**GOOD, "shape": [2, 1, HIDDEN]}, "(seq_len, hidden_size)"),
    ({**GOOD, "shape": [HIDDEN, 2]}, f"(seq_len, {HIDDEN})"),
    ({**GOOD, "data": "text, not bytes"}, "must be binary"),
    ({**GOOD, "data": [0] * 64}, "must be binary"),
    ({**GOOD, "data": bytes(2 * HIDDEN * 4 - 1)}, "needs 64 bytes"),
    ({**GOOD, "data": bytes(2 * HIDDEN * 4 + 4)}, "needs 64 bytes"),
    ({**GOOD, "data": np.full((2, HIDDEN), np.nan, np.float32).tobytes()}, "NaN or infinite"),
    ({**GOOD, "dtype": "bfloat16", "data": b"\x80\x7f" * (2 * HIDDEN)}, "NaN or infinite"),
    ({**GOOD, "dtype": "float16", "data": np.full((2, HIDDEN), np.inf, np.float16).tobytes()},
     "NaN or infinite"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_raw_malformed_entries_are_400(entry, words):
    with pytest.raises(EmbedsError) as info:
        decode_raw(entry)
    assert info.value.status == 400
    assert words in str(info.value), str(info.value)


# --- torch.load reads exactly the bytes that were checked (issue 10, item 1) -------------------

GOOD_T = torch.arange(2 * HIDDEN, dtype=torch.float32).reshape(2, HIDDEN)
GOOD_RAW = saved(GOOD_T)
GOOD_RECORDS = records_of(GOOD_RAW)
GOOD_PKL = dict(GOOD_RECORDS)["archive/data.pkl"]


def decode_raw_bytes(raw: bytes, max_bytes: int = CAP) -> np.ndarray:
    return decode_torch_save_bytes(raw, hidden_size=HIDDEN, max_bytes=max_bytes)


def refused_bytes(raw: bytes, status: int = 400) -> str:
    with pytest.raises(EmbedsError) as info:
        decode_raw_bytes(raw)
    assert info.value.status == status, str(info.value)
    return str(info.value)


def test_layout_helper_writes_what_torch_save_writes():
    for t in (GOOD_T, torch.nn.Parameter(torch.randn(3, HIDDEN)), torch.zeros(0, HIDDEN)):
        raw = saved(t)
        assert build(records_of(raw)).raw == raw
    np.testing.assert_array_equal(decode_raw_bytes(build(GOOD_RECORDS).raw), GOOD_T.numpy())
    # zipfile's plainer layout (sizes in local headers, no padding) holds the same records
    plain = build(GOOD_RECORDS, torch_layout=False).raw
    np.testing.assert_array_equal(decode_raw_bytes(plain), GOOD_T.numpy())


def test_legacy_pickle_before_a_valid_archive_is_refused():
    # zipfile finds the archive at the tail; torch.load unpickles the legacy stream at the head.
    legacy = saved(torch.full((2, HIDDEN), 7.0), _use_new_zipfile_serialization=False)
    payload = legacy + GOOD_RAW
    assert zipfile.ZipFile(io.BytesIO(payload)).namelist()[0] == "archive/data.pkl"
    assert torch.load(io.BytesIO(payload), weights_only=True)[0, 0] == 7.0  # the bypass is live
    assert "does not start with a zip local header" in refused_bytes(payload)
    small_bomb = legacy_bytearray_bomb(1000) + GOOD_RAW  # with 1 << 30 it allocates 1 GiB
    assert len(torch.load(io.BytesIO(small_bomb), weights_only=True)) == 1000
    refused_bytes(legacy_bytearray_bomb() + GOOD_RAW)


@pytest.mark.parametrize("before, after", [
    (b"\x00", b""), (b"PK\x03\x04", b""), (GOOD_RAW, b""),
    (b"", b"\x00"), (b"", GOOD_RAW), (b"", b"PK\x05\x06" + bytes(18)),
    (b"", saved(torch.ones(1), _use_new_zipfile_serialization=False)),
], ids=["byte-before", "local-sig-before", "archive-before", "byte-after", "archive-after",
        "end-record-after", "legacy-after"])
def test_anything_outside_the_archive_is_refused(before, after):
    refused_bytes(before + GOOD_RAW + after)


def test_case_insensitive_name_collision_is_refused():
    # torch looks archive/data.pkl up ignoring case: it would run DATA.PKL, not the checked one.
    payload = case_collision(GOOD_RAW, dict(records_of(saved(GOOD_T[:1])))["archive/data.pkl"])
    assert torch.load(io.BytesIO(payload), weights_only=True).shape == (1, HIDDEN)  # live
    refused_bytes(payload)


@pytest.mark.parametrize("extra", [
    [("archive/Data.pkl", GOOD_PKL)],
    [("archive/data.pkl", GOOD_PKL)],
    [("archive/DATA/0", bytes(64))],
    [("archive/data/0", bytes(64))],
    [("archive/extra", b"")],
    [("archive/.data/version", b"3\n")],            # TorchScript writes it, torch.save does not
    [("archive/data/0/x", b"")],
    [("archive/data/-1", b"")],
    [("archive/data/\u0660", bytes(64))],          # an Arabic-Indic digit zero
    [("archive/data.pkl.bak", b"")],
    [("archive/../data.pkl", b"")],
    [("other/version", b"3\n")],
    [("data.pkl", GOOD_PKL)],
], ids=lambda e: e[0][0])
def test_records_torch_save_does_not_write_are_refused(extra):
    assert "torch.save archive" in refused_bytes(build(GOOD_RECORDS + extra).raw)


@pytest.mark.parametrize("name, content", [
    ("archive/byteorder", b"middle"), ("archive/version", b"3" * 100),
    ("archive/.data/serialization_id", b"x"),
])
def test_small_records_hold_only_what_torch_save_writes(name, content):
    records = [(n, content if n == name else d) for n, d in GOOD_RECORDS]
    refused_bytes(build(records).raw)


def test_unreferenced_or_missing_data_records_are_refused():
    two = build(GOOD_RECORDS + [("archive/data/1", bytes(64))]).raw
    assert "exactly one data record" in refused_bytes(two)
    moved = [("archive/data/7" if n.endswith("data/0") else n, d) for n, d in GOOD_RECORDS]
    assert "exactly one data record" in refused_bytes(build(moved).raw)


# --- the pickle is bounded before it runs -------------------------------------------------------

@pytest.mark.parametrize("op", [b"}", b"(", b"N", b"\x8f", b"]", b")"],
                         ids=["EMPTY_DICT", "MARK", "NONE", "EMPTY_SET", "EMPTY_LIST", "EMPTY_TUPLE"])
@pytest.mark.parametrize("count", [1, 100, 3000, 1_000_000])
def test_opcode_floods_ending_in_a_valid_tensor_are_refused(op, count):
    payload = opcode_flood(GOOD_RAW, op, count)
    if count == 100 and op in (b"}", b"(", b"N"):  # the flood is live: torch.load accepts it
        assert torch.load(io.BytesIO(payload), weights_only=True).shape == (2, HIDDEN)
    msg = refused_bytes(payload)
    if count == 1_000_000:
        assert "data.pkl is" in msg  # refused from the record's size, before parsing it


def test_pickle_over_the_size_cap_is_refused_even_if_well_formed():
    long_location = b"X" + struct.pack("<I", 5000) + b"c" * 5000
    pkl = GOOD_PKL.replace(b"X\x03\x00\x00\x00cpu", long_location)
    assert "data.pkl is" in refused_bytes(build(with_pickle(GOOD_RECORDS, pkl)).raw)


@pytest.mark.parametrize("pkl", [
    GOOD_PKL + b"\x00",                                            # bytes after STOP
    GOOD_PKL.replace(b"X\x07\x00\x00\x00storage", b"X\x07\x00\x00\x00storagf"),
    GOOD_PKL.replace(b"\x80\x02", b"\x80\x04"),
    GOOD_PKL.replace(b"X\x03\x00\x00\x00cpu", b"X\x03\x00\x00\x00CPU"),
    GOOD_PKL[:-1],                                                 # no STOP
    GOOD_PKL[:40],
], ids=["after-stop", "typename", "protocol-4", "location", "no-stop", "truncated"])
def test_pickles_torch_save_would_not_write_are_refused(pkl):
    refused_bytes(build(with_pickle(GOOD_RECORDS, pkl)).raw)


@pytest.mark.parametrize("old, new, words", [
    (b"K\x00K\x02K\x08\x86", b"K\x05K\x02K\x08\x86", "beyond the end"),       # offset 5
    (b"K\x08K\x01\x86", b"K\x08J\xff\xff\xff\xff\x86", "malformed"),         # stride -1
    (b"K\x08K\x01\x86", b"K\x08\x85", "malformed"),                          # rank 1 stride
    (b"K\x02K\x08\x86q\x06K\x08K\x01\x86", b"K\x03K\x08\x86q\x06K\x08K\x01\x86",
     "beyond the end"),                                                      # 3 rows of 2
    (b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x001", "exactly one data record"),  # key 1
])
def test_views_and_storages_that_disagree_with_the_record_are_refused(old, new, words):
    assert old in GOOD_PKL
    assert words in refused_bytes(build(with_pickle(GOOD_RECORDS, GOOD_PKL.replace(old, new))).raw)


# --- every decoding failure is a 400 (issue 10, item 2) ----------------------------------------

NEG_RAW = saved(torch._neg_view(GOOD_T))
NEG_PKL = dict(records_of(NEG_RAW))["archive/data.pkl"]


def test_negative_bit_is_resolved():
    loaded = torch.load(io.BytesIO(NEG_RAW), weights_only=True)
    assert loaded.is_neg()
    with pytest.raises(RuntimeError):
        loaded.numpy()
    np.testing.assert_array_equal(decode_raw_bytes(NEG_RAW), -GOOD_T.numpy())


def test_conjugate_bit_on_a_real_tensor_is_refused():
    forged = NEG_PKL.replace(b"X\x03\x00\x00\x00neg", b"X\x04\x00\x00\x00conj")
    refused_bytes(build(with_pickle(records_of(NEG_RAW), forged)).raw)
    two_bits = NEG_PKL.replace(b"X\x03\x00\x00\x00negq\x0b\x88s",
                               b"(X\x03\x00\x00\x00neg\x88X\x04\x00\x00\x00conj\x88u")
    assert two_bits != NEG_PKL
    refused_bytes(build(with_pickle(records_of(NEG_RAW), two_bits)).raw)


def test_conjugated_complex_tensor_is_refused():
    assert "float32, bfloat16" in refused_bytes(saved(torch.randn(2, HIDDEN, dtype=torch.complex64).conj()))


def good_archive() -> Archive:
    return build(GOOD_RECORDS)


def field_named(archive: Archive, label: str):
    return next(f for f in archive.fields if f.label == label)


@pytest.mark.parametrize("label, value", [
    ("local[0].flags", 0x0809),       # encrypted
    ("central[0].flags", 0x0809),
    ("local[0].flags", 0x0848),       # strong encryption
    ("local[0].method", 99),          # unknown method (AES)
    ("central[0].method", 99),
    ("central[0].method", 8),         # deflate
    ("central[0].method", 14),        # LZMA
    ("central[0].version", 63),
    ("central[0].version", 0xFFFF),   # zipfile: NotImplementedError
    ("local[4].version", 45),
    ("central[0].offset", 0x80000000),  # zip64-style offsets with the high bit set
    ("central[4].offset", 0xFFFFFFFF),
    ("zip64_end.cd_offset", 1 << 63),
    ("zip64_end.cd_offset", (1 << 64) - 1),
    ("zip64_end.n_total", 1 << 40),
    ("zip64_locator.offset", 1 << 63),
    ("end.cd_offset", 0x80000000),
    ("central[2].ext_attr", 0x10),    # the DOS folder bit: torch's reader skips the record
    ("end.n_total", 7 + 1),
    ("central[0].csize", 0xFFFFFFFF),
    ("central[0].usize", 0xFFFFFFFF),
    ("central[0].extra_len", 20),
    ("central[0].name_len", 0xFFFF),
    ("local[0].extra_len", 0xFFFF),
    ("central[0].crc", 0),
    ("descriptor[0].usize", 1),
    ("local[0].crc", 1),
], ids=lambda v: v if isinstance(v, str) else hex(v))
def test_malformed_zip_headers_are_a_400(label, value):
    archive = good_archive()
    refused_bytes(archive.with_field(field_named(archive, label), value))


@pytest.mark.parametrize("label, value", [
    ("local[0].time", 0x1234), ("central[0].date", 0x1234), ("central[0].made_by", 0x031E),
    ("central[0].ext_attr", 0o600 << 16), ("zip64_end.made_by", 0x1234),
    ("end.cd_offset", 0xFFFFFFFF), ("end.cd_size", 0xFFFFFFFF),
], ids=lambda v: v if isinstance(v, str) else hex(v))
def test_fields_torch_ignores_or_defers_to_zip64_may_change(label, value):
    archive = good_archive()
    np.testing.assert_array_equal(
        decode_raw_bytes(archive.with_field(field_named(archive, label), value)), GOOD_T.numpy())


# --- error messages quote a short prefix of what the client sent (issue 10, item 4) -------------

LONG = "x" * 10_000_000


@pytest.mark.parametrize("entry", [
    {"dtype": LONG, "shape": [2, HIDDEN], "data": b""},
    {"dtype": "float32", "shape": [LONG], "data": b""},
    {"dtype": "float32", "shape": [1] * 1_000_000, "data": b""},
    {"dtype": "float32", "shape": [-1] * 1_000_000, "data": b""},
    {"dtype": "float32", "shape": [2, HIDDEN], "data": b"", LONG: 1},
    {"dtype": "float32", "shape": [2, HIDDEN], "data": b"", **{str(i): i for i in range(100_000)}},
], ids=["dtype", "shape-str", "shape-rank", "shape-negative", "extra-key", "many-keys"])
def test_raw_entry_errors_quote_a_short_prefix(entry):
    with pytest.raises(EmbedsError) as info:
        decode_raw(entry)
    assert info.value.status == 400 and len(str(info.value)) < 400, str(info.value)[:500]


def test_record_name_errors_quote_a_short_prefix():
    msg = refused_bytes(build(GOOD_RECORDS + [("archive/" + "y" * 60_000, b"")]).raw)
    assert len(msg) < 400
