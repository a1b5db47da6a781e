"""Safe decoding of untrusted prompt embeds, done once in the router.

Two wire forms arrive here:

* base64 of ``torch.save(tensor)`` bytes (what vLLM clients send in JSON bodies);
* a msgpack entry ``{"dtype", "shape", "data"}`` carrying raw little-endian bytes.

Both end as a C-contiguous numpy array of shape ``(seq_len, hidden_size)``: float32 for
float32/bfloat16/float64 inputs (numpy has no bfloat16), float16 kept as float16.

``max_bytes`` caps the tensor's data: ``seq_len * hidden_size * itemsize`` of the tensor as sent.
Everything that could allocate in proportion to what a payload *declares* (the base64 text, the
zip records of a ``torch.save`` archive, the objects its pickle would build, the tensor's shape)
is checked against that cap before the allocation happens. Nothing is ever unpickled beyond
``torch.load(weights_only=True)``, and its pickle is first checked against a short allow-list of
the globals that ``torch.save`` writes for one plain dense floating tensor.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import pickletools
import zipfile

import numpy as np
import torch

# Room for the torch.save container around the tensor bytes: zip headers, the pickle, the small
# metadata records and the 64-byte alignment padding torch writes before each data record.
CONTAINER_OVERHEAD_BYTES = 64 * 1024

# The globals torch.save writes for one plain dense tensor of an accepted dtype.
_ALLOWED_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "HalfStorage"),
    ("torch", "DoubleStorage"),
})
# Opcodes that import or construct by name other than GLOBAL.
_IMPORTING_OPS = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"})

_TORCH_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}
_RAW_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_RAW_KEYS = frozenset({"dtype", "shape", "data"})


class EmbedsError(ValueError):
    """A prompt embeds payload the router refuses; ``status`` is the HTTP status (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


def _too_large(what: str, size: int, max_bytes: int) -> EmbedsError:
    return EmbedsError(f"prompt_embeds too large: {what} is {size} bytes, the limit is "
                       f"{max_bytes} bytes", status=413)


def _shape_error(hidden_size: int, shape) -> EmbedsError:
    return EmbedsError(
        f"prompt_embeds must have shape (seq_len, hidden_size) = (seq_len, {hidden_size}) "
        f"or (1, seq_len, {hidden_size}); got {tuple(shape)}")


def _max_container_bytes(max_bytes: int) -> int:
    return max_bytes + CONTAINER_OVERHEAD_BYTES


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


# ---------------------------------------------------------------- base64 of torch.save bytes

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
        raise EmbedsError(f"prompt_embeds is not valid base64: {exc}") from None
    return decode_torch_save_bytes(raw, hidden_size=hidden_size, max_bytes=max_bytes)


def decode_torch_save_bytes(raw: bytes, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """Decode ``torch.save(tensor)`` bytes into a (seq_len, hidden_size) array."""
    if len(raw) > _max_container_bytes(max_bytes):
        raise _too_large("the torch.save payload", len(raw), _max_container_bytes(max_bytes))
    tensor = _load_tensor(raw, max_bytes)
    return _tensor_to_array(tensor, hidden_size=hidden_size, max_bytes=max_bytes)


def _load_tensor(raw: bytes, max_bytes: int) -> torch.Tensor:
    pickle_bytes = _check_archive(raw, max_bytes)
    _check_pickle_globals(pickle_bytes)
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu", mmap=False)
    except Exception as exc:  # torch raises many types for malformed archives
        raise EmbedsError(f"prompt_embeds could not be loaded as a torch.save tensor: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return obj


def _check_archive(raw: bytes, max_bytes: int) -> bytes:
    """Check the zip container's declared sizes before torch reads it; return its pickle."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise EmbedsError("prompt_embeds is not a torch.save archive (expected base64 of "
                          f"torch.save(tensor) bytes): {exc}") from None
    data_bytes = sum(e.file_size for e in entries if _is_data_record(e.filename))
    if data_bytes > max_bytes:
        raise _too_large("the declared tensor storage", data_bytes, max_bytes)
    total_bytes = sum(e.file_size for e in entries)
    if total_bytes > _max_container_bytes(max_bytes):
        raise _too_large("the declared archive content", total_bytes,
                         _max_container_bytes(max_bytes))
    for entry in entries:
        # torch.save stores records uncompressed; a compressed record is not one of its archives.
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise EmbedsError(f"prompt_embeds archive record {entry.filename!r} is compressed; "
                              "torch.save archives are stored uncompressed")
        if entry.header_offset + entry.compress_size > len(raw):
            raise EmbedsError(f"prompt_embeds archive record {entry.filename!r} runs past the end")
    pickles = [e for e in entries if e.filename.endswith("/data.pkl") or e.filename == "data.pkl"]
    if len(pickles) != 1:
        raise EmbedsError("prompt_embeds archive must hold exactly one data.pkl record")
    try:
        return archive.read(pickles[0])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EmbedsError(f"prompt_embeds archive is corrupt: {exc}") from None


def _is_data_record(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data"


def _check_pickle_globals(pickle_bytes: bytes) -> None:
    """Refuse a pickle naming any global beyond those torch.save writes for one plain tensor.

    torch.load(weights_only=True) never runs arbitrary code, but its allow-list still lets a
    tiny pickle allocate without bound (``bytearray(n)``, quantized tensors of any declared
    size) or build sparse and nested tensors. This scan reads the opcodes without executing
    them. The weights-only unpickler imports through GLOBAL only, so every other importing
    opcode is refused here too.
    """
    try:
        for opcode, arg, _pos in pickletools.genops(pickle_bytes):
            if opcode.name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _check_global(module, attr)
            elif opcode.name in _IMPORTING_OPS:
                raise EmbedsError(f"prompt_embeds pickle uses the {opcode.name} opcode, which "
                                  "a torch.save tensor never does")
    except EmbedsError:
        raise
    except Exception as exc:  # pickletools raises ValueError and others on malformed data
        raise EmbedsError(f"prompt_embeds pickle is malformed: {str(exc)[:200]}") from None


def _check_global(module: str, attr: str) -> None:
    if (module, attr) in _ALLOWED_GLOBALS:
        return
    if attr.endswith("Storage"):
        reason = (f"its data is a {module}.{attr}; prompt_embeds must be float32, bfloat16, "
                  "float16 or float64")
    elif "sparse" in attr:
        reason = "it is a sparse tensor; prompt_embeds must be a dense tensor"
    elif "qtensor" in attr:
        reason = "it is a quantized tensor; prompt_embeds must be a plain floating tensor"
    elif "nested" in attr:
        reason = "it is a nested tensor; prompt_embeds must be a plain dense tensor"
    else:
        reason = f"its pickle refers to {module}.{attr}, which is not accepted"
    raise EmbedsError("prompt_embeds must be one plain dense floating tensor saved with "
                      f"torch.save: {reason}")


def _tensor_to_array(obj, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    if type(obj) not in (torch.Tensor, torch.nn.Parameter):
        raise EmbedsError(f"prompt_embeds must be a torch.Tensor of shape (seq_len, "
                          f"{hidden_size}), got a {type(obj).__name__}")
    if obj.layout != torch.strided:
        raise EmbedsError(f"prompt_embeds must be a dense tensor, got layout {obj.layout}; "
                          "sparse tensors are not accepted")
    if obj.is_quantized or obj.is_nested or obj.device.type != "cpu":
        raise EmbedsError("prompt_embeds must be a plain dense tensor (not quantized, nested "
                          "or on a device)")
    if obj.dtype not in _TORCH_DTYPES:
        raise EmbedsError(f"prompt_embeds must be float32, bfloat16, float16 or float64, got "
                          f"{obj.dtype}")
    # A pickle may declare a shape larger than its storage (zero strides); check the shape
    # itself before anything is made contiguous.
    declared = math.prod(obj.shape) * obj.element_size()
    if declared > max_bytes:
        raise _too_large(f"the declared tensor {tuple(obj.shape)} {obj.dtype}", declared,
                         max_bytes)
    seq_len, hidden = _seq_shape(tuple(obj.shape), hidden_size)
    tensor = obj.detach().reshape(seq_len, hidden)
    if tensor.dtype != torch.float16:
        tensor = tensor.to(torch.float32)
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # do not keep a larger saved storage alive behind a view
    array = tensor.numpy()
    _check_finite(array)
    return array


# ---------------------------------------------------------------- msgpack raw entries

def decode_raw_embeds(entry: dict, *, hidden_size: int, max_bytes: int) -> np.ndarray:
    """Decode ``{"dtype", "shape", "data"}`` (raw little-endian bytes) without any pickle."""
    if not isinstance(entry, dict):
        raise EmbedsError("a raw prompt_embeds entry must be a map with keys dtype, shape, data; "
                          f"got {type(entry).__name__}")
    keys = set(entry)
    if keys != _RAW_KEYS:
        missing, extra = sorted(_RAW_KEYS - keys, key=str), sorted(keys - _RAW_KEYS, key=str)
        raise EmbedsError(f"a raw prompt_embeds entry must have exactly the keys dtype, shape, "
                          f"data (missing {missing}, unexpected {extra})")
    dtype_name, shape, data = entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _RAW_DTYPES:
        raise EmbedsError(f"raw prompt_embeds dtype must be one of {sorted(_RAW_DTYPES)}, got "
                          f"{dtype_name!r}")
    if (not isinstance(shape, (list, tuple)) or not shape
            or any(type(d) is not int for d in shape)):
        raise EmbedsError(f"raw prompt_embeds shape must be a list of integers, got {shape!r}")
    if any(d <= 0 for d in shape):
        raise EmbedsError(f"raw prompt_embeds shape dimensions must be > 0, got {list(shape)}")
    wire_dtype = _RAW_DTYPES[dtype_name]
    declared = math.prod(shape) * wire_dtype.itemsize
    if declared > max_bytes:
        raise _too_large(f"the declared tensor {tuple(shape)} {dtype_name}", declared, max_bytes)
    seq_len, hidden = _seq_shape(tuple(shape), hidden_size)
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
