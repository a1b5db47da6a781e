"""Safe decoding of untrusted prompt embeds, done once in the router.

Two wire forms arrive here:

* base64 of ``torch.save(tensor)`` bytes (what vLLM clients send in JSON bodies);
* a msgpack entry ``{"dtype", "shape", "data"}`` carrying raw little-endian bytes.

Both end as a C-contiguous numpy array of shape ``(seq_len, hidden_size)``: float32 for
float32/bfloat16/float64 inputs (numpy has no bfloat16), float16 kept as float16.

``max_bytes`` caps the tensor's data: ``seq_len * hidden_size * itemsize`` of the tensor as sent,
for a sparse tensor of its dense form (checked before it is allocated).

``torch.load`` only ever runs on bytes that were checked whole, without ``zipfile`` (whose reading
differs from torch's): the zip archive starts at offset 0 and its records, central directory and
end records tile the input exactly; the record names are the ones ``torch.save`` writes (no case
collisions, no duplicates); ``data.pkl`` is a few hundred bytes whose opcodes spell exactly what
``torch.save`` writes for one dense tensor (router.torch_pickle); and the storage, shape and
strides it declares agree with the data record and the size cap.

A sparse COO, CSR or CSC tensor (which vLLM accepts, so that clients can send fewer bytes) never
reaches ``torch.load``: its parts are read from their checked records, its invariants checked
and its dense size capped before it is densified (router.sparse_embeds). Quantized, complex,
integer, nested and non-tensor payloads stay refused. Every other failure of any layer becomes an
``EmbedsError`` (400), never another exception.
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from router.errors import EmbedsError, quote
from router.errors import embeds_too_large as _too_large
from router.sparse_embeds import densify
from router.torch_pickle import FLOAT_STORAGES, MAX_PICKLE_BYTES, SparsePlan, TensorPlan, read_plan

__all__ = ["EmbedsError", "decode_base64_embeds", "decode_embeds_entry", "decode_raw_embeds",
           "decode_torch_save_bytes"]

# Room for the torch.save container around the tensor bytes: zip headers, the pickle, the small
# metadata records and the 64-byte alignment padding torch writes before each data record.
CONTAINER_OVERHEAD_BYTES = 64 * 1024

_TORCH_DTYPES = set(FLOAT_STORAGES.values())
_RAW_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_RAW_KEYS = frozenset({"dtype", "shape", "data"})


def _shape_error(hidden_size: int, shape) -> EmbedsError:
    return EmbedsError(
        f"prompt_embeds must have shape (seq_len, hidden_size) = (seq_len, {hidden_size}) "
        f"or (1, seq_len, {hidden_size}); got {quote(tuple(shape))}")


def _max_container_bytes(max_bytes: int) -> int:
    return max_bytes + CONTAINER_OVERHEAD_BYTES


def _only_embeds_errors(decode):
    """The last line of defence: whatever a payload makes any layer raise is the client's 400."""

    @functools.wraps(decode)
    def wrapper(*args, **kwargs):
        try:
            return decode(*args, **kwargs)
        except EmbedsError:
            raise
        except Exception as exc:  # noqa: BLE001 - zip, pickle, torch and numpy raise many types
            raise EmbedsError(f"prompt_embeds could not be decoded: {type(exc).__name__}: "
                              f"{quote(str(exc))}") from None

    return wrapper


# ---------------------------------------------------------------- shared shape and value checks

def _seq_shape(shape: tuple[int, ...], hidden_size: int) -> tuple[int, int]:
    """(seq_len, hidden) from a rank-2 shape or a rank-3 shape with a leading 1."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[1] != hidden_size:
        raise _shape_error(hidden_size, shape)
    if shape[0] == 0:
        raise EmbedsError(f"prompt_embeds is empty: seq_len is 0 (shape (0, {hidden_size}))")
    return shape[0], shape[1]


def _check_finite(array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise EmbedsError("prompt_embeds contains NaN or infinite values")


# ---------------------------------------------------------------- entry points

@_only_embeds_errors
def decode_embeds_entry(entry, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """One prompt_embeds entry of a request body, whichever wire form it takes.

    str: base64 of torch.save bytes (JSON or msgpack); bytes: torch.save bytes themselves
    (msgpack); dict: a raw ``{"dtype", "shape", "data"}`` entry (msgpack).
    """
    if isinstance(entry, str):
        return decode_base64_embeds(entry, hidden_size=hidden_size, max_bytes=max_bytes)
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return decode_torch_save_bytes(bytes(entry), hidden_size=hidden_size, max_bytes=max_bytes)
    if isinstance(entry, dict):
        return decode_raw_embeds(entry, hidden_size=hidden_size, max_bytes=max_bytes)
    raise EmbedsError("prompt_embeds entries must be base64 strings of torch.save bytes (or, in "
                      f"msgpack, torch.save bytes or a dtype/shape/data map); got "
                      f"{type(entry).__name__}")


@_only_embeds_errors
def decode_base64_embeds(b64: str, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """Decode base64 of ``torch.save(tensor)`` bytes into a (seq_len, hidden_size) array."""
    if not isinstance(b64, (str, bytes)):
        raise EmbedsError(f"prompt_embeds must be a base64 string, got {type(b64).__name__}")
    max_b64 = 4 * math.ceil(_max_container_bytes(max_bytes) / 3)
    if len(b64) > max_b64:
        raise _too_large("the base64 text", len(b64), max_b64)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EmbedsError(f"prompt_embeds is not valid base64: {quote(str(exc))}") from None
    return decode_torch_save_bytes(raw, hidden_size=hidden_size, max_bytes=max_bytes)


@_only_embeds_errors
def decode_torch_save_bytes(raw: bytes, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """Decode ``torch.save(tensor)`` bytes into a (seq_len, hidden_size) array."""
    if len(raw) > _max_container_bytes(max_bytes):
        raise _too_large("the torch.save payload", len(raw), _max_container_bytes(max_bytes))
    raw = bytes(raw)  # immutable: torch.load reads exactly the bytes checked below
    records = _read_archive(raw, max_bytes)
    plan = read_plan(records["data.pkl"])
    if isinstance(plan, SparsePlan):
        _check_storages(plan.parts, records, max_bytes)
        seq_len, hidden = _seq_shape(plan.size, hidden_size)  # before anything is densified
        dense = densify(plan, records, max_bytes=max_bytes,
                        big_endian=records.get("byteorder") == b"big")
        return _to_array(dense, seq_len, hidden)
    _check_storages((plan,), records, max_bytes)
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu", mmap=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for inconsistent archives
        raise EmbedsError(f"prompt_embeds could not be loaded as a torch.save tensor: "
                          f"{type(exc).__name__}: {quote(str(exc))}") from None
    return _tensor_to_array(tensor, plan, hidden_size=hidden_size)


# ---------------------------------------------------------------- the zip layer

_LOCAL = struct.Struct("<IHHHHHIIIHH")              # local file header, then name and extra
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")      # central directory entry, then name
_DESCRIPTOR = struct.Struct("<IIII")                # signature, crc, sizes (after the data)
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_SIG_LOCAL, _SIG_CENTRAL, _SIG_DESCRIPTOR = 0x04034B50, 0x02014B50, 0x08074B50
_SIG_ZIP64_END, _SIG_ZIP64_LOCATOR, _SIG_END = 0x06064B50, 0x07064B50, 0x06054B50

_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0008, 0x0800
_DOS_DIRECTORY = 0x10        # in a directory entry's external attributes
_MAX_VERSION_NEEDED = 20     # 2.0: stored records; zip64 (4.5) and encryption are never needed
_PADDING_FIELD = 0x4246      # the "FB" extra field torch pads records with to align their data

# Record names torch.save writes under the archive's one top folder, with what each may hold.
_META_RECORDS = {
    "data.pkl": None,                                   # checked by read_plan
    "byteorder": re.compile(rb"little|big"),
    "version": re.compile(rb"[1-9]\n?"),  # torch.save writes 3; torch.load refuses 0 and > 10
    ".format_version": re.compile(rb"\d{1,4}"),
    ".storage_alignment": re.compile(rb"\d{1,8}"),
    ".data/serialization_id": re.compile(rb"\d{1,64}"),
}
_DATA_RECORD = re.compile(r"data/[0-9]{1,9}")
_TOP_FOLDER = re.compile(r"[^/\\\x00-\x1f]{1,128}")
# A dense tensor has one data record, a sparse one two or three; room for a few more lets the
# pickle check say what a nested tensor is rather than only that it has too many records.
_MAX_RECORDS = len(_META_RECORDS) + 8


@dataclass
class _Entry:
    """One record as its central directory entry declares it."""

    name: str
    flags: int
    crc: int
    size: int
    offset: int


def _zip_error(detail: str) -> EmbedsError:
    return EmbedsError(f"prompt_embeds is not a torch.save archive (expected base64 of "
                       f"torch.save(tensor) bytes): {detail}")


def _unpack(layout: struct.Struct, raw: bytes, pos: int, signature: int, what: str) -> tuple:
    if pos < 0 or pos + layout.size > len(raw):
        raise _zip_error(f"the {what} lies outside the input")
    fields = layout.unpack_from(raw, pos)
    if fields[0] != signature:
        raise _zip_error(f"no {what} where the archive places one")
    return fields


def _read_archive(raw: bytes, max_bytes: int) -> dict[str, bytes]:
    """Check the whole zip structure; its records by name below the top folder.

    The archive must start at offset 0 and end exactly where the input does, so nothing before
    or after it (a legacy torch pickle at the head, a second archive at the tail) goes unchecked.
    """
    if raw[:4] != _SIG_LOCAL.to_bytes(4, "little"):
        raise _zip_error("it does not start with a zip local header (the legacy, non-zip "
                         "torch.save format is not accepted)")
    cd_offset, cd_end, count = _directory_span(raw)
    entries = _central_entries(raw, cd_offset, cd_end, count)
    top = _check_names([e.name for e in entries])
    records = {name[len(top) + 1:]: data
               for name, data in _local_records(raw, entries, cd_offset).items()}
    _check_record_sizes(records, max_bytes)
    return records


def _directory_span(raw: bytes) -> tuple[int, int, int]:
    """(start, end, entry count) of the central directory, which must run up to the end records."""
    end_pos = len(raw) - _END.size
    (_, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment) = _unpack(
        _END, raw, end_pos, _SIG_END, "end of central directory record at the end of the input")
    if disk or cd_disk or comment or n_disk != n_total:
        raise _zip_error("its end record declares several disks or a comment")
    cd_end = end_pos
    locator_pos = end_pos - _ZIP64_LOCATOR.size
    if locator_pos >= 0 and raw[locator_pos:locator_pos + 4] == _SIG_ZIP64_LOCATOR.to_bytes(4, "little"):
        n_total, cd_size, cd_offset, cd_end = _zip64_end(raw, locator_pos, (n_total, cd_size, cd_offset))
    if n_total > _MAX_RECORDS:
        raise _zip_error(f"it declares {n_total} records; torch.save writes at most {_MAX_RECORDS}")
    if cd_offset + cd_size != cd_end:
        raise _zip_error("its central directory does not end where its end records begin")
    return cd_offset, cd_end, n_total


def _zip64_end(raw: bytes, locator_pos: int, classic: tuple[int, int, int]) -> tuple[int, ...]:
    """torch writes zip64 end records even for small archives; they must agree with the classic one."""
    _, disk, end64_pos, disks = _unpack(_ZIP64_LOCATOR, raw, locator_pos, _SIG_ZIP64_LOCATOR,
                                        "zip64 end locator")
    if disk or disks != 1 or end64_pos != locator_pos - _ZIP64_END.size:
        raise _zip_error("its zip64 locator does not point right before itself")
    (_, record_size, _made, needed, disk, cd_disk, n_disk, n_total, cd_size, cd_offset) = _unpack(
        _ZIP64_END, raw, end64_pos, _SIG_ZIP64_END, "zip64 end record")
    if record_size != _ZIP64_END.size - 12 or needed > 45 or disk or cd_disk or n_disk != n_total:
        raise _zip_error("its zip64 end record is not a plain one")
    for value, sentinel, value64 in zip(classic, (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
                                        (n_total, cd_size, cd_offset)):
        if value not in (sentinel, value64):
            raise _zip_error("its zip64 and classic end records disagree")
    return n_total, cd_size, cd_offset, end64_pos


def _central_entries(raw: bytes, cd_offset: int, cd_end: int, count: int) -> list[_Entry]:
    entries, pos = [], cd_offset
    for _ in range(count):
        (_, _made, needed, flags, method, _time, _date, crc, csize, usize, name_len, extra_len,
         comment_len, disk, _int_attr, ext_attr, offset) = _unpack(
            _CENTRAL, raw, pos, _SIG_CENTRAL, "central directory entry")
        name = _record_name(raw, pos + _CENTRAL.size, name_len, flags)
        _check_record_header(name, needed, flags, method)
        if ext_attr & _DOS_DIRECTORY:  # torch's zip reader takes such a record for a folder
            raise _zip_error(f"record {quote(name)} is marked as a folder")
        if extra_len or comment_len or disk:
            raise _zip_error(f"its directory entry for {quote(name)} has extra fields, a comment "
                             "or a disk number (zip64 and split archives are not accepted)")
        if csize != usize:
            raise _zip_error(f"record {quote(name)} is compressed; torch.save stores records as is")
        entries.append(_Entry(name, flags, crc, usize, offset))
        pos += _CENTRAL.size + name_len
    if pos != cd_end:
        raise _zip_error("its central directory holds more than its entries")
    return entries


def _record_name(raw: bytes, pos: int, length: int, flags: int) -> str:
    if pos + length > len(raw):
        raise _zip_error("a record name runs past the end of the input")
    try:
        return raw[pos:pos + length].decode("utf-8" if flags & _FLAG_UTF8 else "ascii")
    except UnicodeDecodeError:
        raise _zip_error("a record name is not valid text") from None


def _check_record_header(name: str, needed: int, flags: int, method: int) -> None:
    if flags & ~(_FLAG_DESCRIPTOR | _FLAG_UTF8):
        raise _zip_error(f"record {quote(name)} has flags {flags:#06x} (encrypted or otherwise "
                         "not a plain stored record)")
    if method != 0:
        raise _zip_error(f"record {quote(name)} is compressed (method {method}); torch.save "
                         "stores records as is")
    if needed > _MAX_VERSION_NEEDED:
        raise _zip_error(f"record {quote(name)} needs zip version {needed / 10:.1f}; torch.save "
                         f"records need at most {_MAX_VERSION_NEEDED / 10:.1f}")


def _check_names(names: list[str]) -> str:
    """The one top folder of the names torch.save writes; no duplicates, even ignoring case."""
    tops = {name.partition("/")[0] for name in names}
    if len(tops) != 1 or not _TOP_FOLDER.fullmatch(top := tops.pop()) or top in (".", ".."):
        raise _zip_error("its records do not share one top folder, as torch.save writes them")
    folded = {name.casefold() for name in names}
    if len(folded) != len(names):
        raise _zip_error("it holds duplicate record names (ignoring case)")
    below = [name[len(top) + 1:] for name in names]
    for name in below:
        if name not in _META_RECORDS and not _DATA_RECORD.fullmatch(name):
            raise _zip_error(f"it holds a record {quote(top + '/' + name)}, which torch.save "
                             "does not write")
    for required in ("data.pkl", "version"):  # torch.load needs both
        if required not in below:
            raise _zip_error(f"it holds no {required} record")
    return top


def _local_records(raw: bytes, entries: list[_Entry], cd_offset: int) -> dict[str, bytes]:
    """Walk the local records from offset 0: each where its directory entry says, back to back."""
    records, pos = {}, 0
    for entry in entries:
        if entry.offset != pos:
            raise _zip_error(f"record {quote(entry.name)} is not where the previous one ends")
        start, end, pos = _local_extent(raw, entry)
        if pos > cd_offset:
            raise _zip_error(f"record {quote(entry.name)} runs into the central directory")
        data = raw[start:end]
        if zlib.crc32(data) != entry.crc:
            raise _zip_error(f"record {quote(entry.name)} fails its CRC check")
        records[entry.name] = data
    if pos != cd_offset:
        raise _zip_error("there are bytes between its last record and its central directory")
    return records


def _local_extent(raw: bytes, entry: _Entry) -> tuple[int, int, int]:
    """(data start, data end, next record) of one local record that agrees with its entry."""
    (_, needed, flags, method, _time, _date, crc, csize, usize, name_len, extra_len) = _unpack(
        _LOCAL, raw, entry.offset, _SIG_LOCAL, "local header")
    name = _record_name(raw, entry.offset + _LOCAL.size, name_len, flags)
    _check_record_header(name, needed, flags, method)
    start = entry.offset + _LOCAL.size + name_len
    _check_padding(raw, start, extra_len, name)
    start += extra_len
    end = after = start + entry.size
    sizes = (entry.crc, entry.size, entry.size)
    if flags & _FLAG_DESCRIPTOR:  # what torch writes: zeros here, the values after the data
        after = end + _DESCRIPTOR.size
        if _unpack(_DESCRIPTOR, raw, end, _SIG_DESCRIPTOR, "data descriptor")[1:] != sizes:
            raise _zip_error(f"the data descriptor of {quote(name)} disagrees with its entry")
        sizes = (0, 0, 0)
    if name != entry.name or flags != entry.flags or (crc, csize, usize) != sizes:
        raise _zip_error(f"the local header of {quote(entry.name)} disagrees with its "
                         "directory entry")
    return start, end, after


def _check_padding(raw: bytes, pos: int, length: int, name: str) -> None:
    """A local extra field may only be torch's alignment padding."""
    end = pos + length
    if end > len(raw):
        raise _zip_error(f"the extra field of {quote(name)} runs past the end of the input")
    while pos < end:
        if pos + 4 > end:
            raise _zip_error(f"the extra field of {quote(name)} is malformed")
        field_id, size = struct.unpack_from("<HH", raw, pos)
        if field_id != _PADDING_FIELD or pos + 4 + size > end:
            raise _zip_error(f"record {quote(name)} has an extra field torch.save does not write "
                             f"(id {field_id:#06x})")
        pos += 4 + size


def _check_record_sizes(records: dict[str, bytes], max_bytes: int) -> None:
    for name, data in records.items():
        if _DATA_RECORD.fullmatch(name):
            if len(data) > max_bytes:
                raise _too_large("the declared tensor storage", len(data), max_bytes)
        elif name == "data.pkl":
            if len(data) > MAX_PICKLE_BYTES:
                raise EmbedsError(f"prompt_embeds data.pkl is {len(data)} bytes; torch.save "
                                  f"writes at most {MAX_PICKLE_BYTES} for one tensor")
        elif not _META_RECORDS[name].fullmatch(data):
            raise _zip_error(f"its {name} record holds {quote(data)}, which torch.save does not "
                             "write")


# ---------------------------------------------------------------- the storages a plan reads

def _check_storages(parts: tuple[TensorPlan, ...], records: dict[str, bytes],
                    max_bytes: int) -> None:
    """The data records are exactly the ones the pickle's tensors view, each once; each view's
    storage, shape and strides agree with its record and the cap."""
    keys = [p.key for p in parts]
    data_records = {name for name in records if _DATA_RECORD.fullmatch(name)}
    if len(set(keys)) != len(keys) or data_records != {f"data/{k}" for k in keys}:
        wanted = ", ".join(f"data/{k}" for k in keys)
        count = "exactly one data record" if len(keys) == 1 else f"exactly {len(keys)} data records"
        raise EmbedsError(f"prompt_embeds archive must hold {count}, the {wanted} its pickle "
                          "refers to")
    for plan in parts:
        data = records[f"data/{plan.key}"]
        if plan.numel * plan.itemsize != len(data):
            raise EmbedsError(f"prompt_embeds pickle declares a storage of {plan.numel} elements, "
                              f"but its record holds {len(data)} bytes")
        if len(plan.size) != len(plan.stride) or min(plan.size + plan.stride + (plan.offset,),
                                                     default=0) < 0:
            raise EmbedsError("prompt_embeds pickle declares a malformed shape or strides")
        declared = math.prod(plan.size) * plan.itemsize
        if declared > max_bytes:
            raise _too_large(f"the declared tensor {quote(plan.size)}", declared, max_bytes)
        last = plan.offset + sum((n - 1) * s for n, s in zip(plan.size, plan.stride))
        if 0 not in plan.size and last >= plan.numel:
            raise EmbedsError(f"prompt_embeds pickle declares a view of shape {quote(plan.size)} "
                              "beyond the end of its storage")


# ---------------------------------------------------------------- the loaded tensor

def _tensor_to_array(obj, plan: TensorPlan, *, hidden_size: int) -> np.ndarray:
    if type(obj) not in (torch.Tensor, torch.nn.Parameter):
        raise EmbedsError(f"prompt_embeds must be a torch.Tensor of shape (seq_len, "
                          f"{hidden_size}), got a {type(obj).__name__}")
    if (obj.layout != torch.strided or obj.is_quantized or obj.is_nested
            or obj.device.type != "cpu" or obj.dtype not in _TORCH_DTYPES or obj.is_conj()
            or obj.dtype != plan.dtype or tuple(obj.shape) != plan.size
            or tuple(obj.stride()) != plan.stride):
        raise EmbedsError("prompt_embeds loaded as something other than what its pickle declares")
    seq_len, hidden = _seq_shape(plan.size, hidden_size)
    # The neg bit is a lazy negation numpy refuses; resolving it copies at most max_bytes.
    return _to_array(obj.detach().resolve_neg(), seq_len, hidden)


def _to_array(tensor: torch.Tensor, seq_len: int, hidden: int) -> np.ndarray:
    """float32 (float16 kept), C-contiguous, finite, owning no more storage than it shows."""
    tensor = tensor.reshape(seq_len, hidden)
    if tensor.dtype != torch.float16:
        tensor = tensor.to(torch.float32)
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # do not keep a larger saved storage alive behind a view
    array = tensor.numpy()
    _check_finite(array)
    return array


# ---------------------------------------------------------------- msgpack raw entries

@_only_embeds_errors
def decode_raw_embeds(entry: dict, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """Decode ``{"dtype", "shape", "data"}`` (raw little-endian bytes) without any pickle."""
    if not isinstance(entry, dict):
        raise EmbedsError("a raw prompt_embeds entry must be a map with keys dtype, shape, data; "
                          f"got {type(entry).__name__}")
    keys = set(entry)
    if keys != _RAW_KEYS:
        missing, extra = sorted(_RAW_KEYS - keys, key=str), sorted(keys - _RAW_KEYS, key=str)
        raise EmbedsError(f"a raw prompt_embeds entry must have exactly the keys dtype, shape, "
                          f"data (missing {missing}, unexpected {quote(extra)})")
    dtype_name, shape, data = entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _RAW_DTYPES:
        raise EmbedsError(f"raw prompt_embeds dtype must be one of {sorted(_RAW_DTYPES)}, got "
                          f"{quote(dtype_name)}")
    shape = _raw_shape(shape, hidden_size)
    wire_dtype = _RAW_DTYPES[dtype_name]
    declared = math.prod(shape) * wire_dtype.itemsize
    if declared > max_bytes:
        raise _too_large(f"the declared tensor {shape} {dtype_name}", declared, max_bytes)
    seq_len, hidden = _seq_shape(shape, hidden_size)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EmbedsError(f"raw prompt_embeds data must be binary, got {type(data).__name__}")
    nbytes = memoryview(data).nbytes
    if nbytes != declared:
        raise EmbedsError(f"raw prompt_embeds data is {nbytes} bytes but shape {list(shape)} "
                          f"of {dtype_name} needs {declared} bytes")
    wire = np.frombuffer(data, dtype=wire_dtype).reshape(seq_len, hidden)
    if dtype_name == "bfloat16":
        array = (wire.astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.ascontiguousarray(wire, dtype=wire_dtype.newbyteorder("="))
    _check_finite(array)
    return array


def _raw_shape(shape, hidden_size: int) -> tuple[int, ...]:
    """A msgpack shape as a tuple of positive ints of rank 2 or 3 (checked before any product)."""
    if (not isinstance(shape, (list, tuple)) or not shape
            or any(type(d) is not int for d in shape)):
        raise EmbedsError(f"raw prompt_embeds shape must be a list of integers, got {quote(shape)}")
    if any(d <= 0 for d in shape):
        raise EmbedsError(f"raw prompt_embeds shape dimensions must be > 0, got {quote(shape)}")
    if len(shape) > 3:
        raise _shape_error(hidden_size, shape)
    return tuple(shape)
