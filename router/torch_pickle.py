"""A torch.save archive's data.pkl read without running it, into a plan of what it would build.

``pickletools.genops`` walks the opcodes (it executes nothing); each becomes one letter, and the
letters must spell what torch.save writes for one tensor:

* a dense tensor: ``_rebuild_tensor_v2(persistent storage id, offset, size, stride,
  requires_grad, OrderedDict() [, {"neg": bool}])``, or that wrapped in ``_rebuild_parameter``;
* a sparse COO, CSR or CSC tensor: ``_rebuild_sparse_tensor(_get_layout(name), (parts...,
  torch.Size(size) [, is_coalesced]))`` whose parts (indices, values) are dense tensors as above.

The plan names each storage record, its dtype, offset, size and strides; the caller checks them
against the archive's records and the size cap before anything is built from them. Memo reads
(BINGET) are followed only for single values (a class, a string, an int): what they push is then
exactly the memoized value.
"""
from __future__ import annotations

import pickletools
import re
from dataclasses import dataclass

import torch

from router.errors import EmbedsError, quote

# torch.save writes a ~150-byte data.pkl for one dense tensor (~200 for an nn.Parameter, ~410 for
# a CSR tensor).
MAX_PICKLE_BYTES = 4096
# Opcodes: ~35 for a tensor, ~50 for a parameter, ~95 for a CSR tensor, +2 per dimension past 3.
MAX_PICKLE_OPS = 160

FLOAT_STORAGES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16,
                  "HalfStorage": torch.float16, "DoubleStorage": torch.float64}
INDEX_STORAGES = {"LongStorage": torch.int64, "IntStorage": torch.int32}
SPARSE_LAYOUTS = {"torch.sparse_coo": "coo", "torch.sparse_csr": "csr", "torch.sparse_csc": "csc"}
FLOAT_DTYPES_TEXT = "float32, bfloat16, float16 or float64"

_GLOBAL_TOKENS = {
    "torch._utils _rebuild_tensor_v2": "T",
    "torch._utils _rebuild_parameter": "A",
    "torch._utils _rebuild_sparse_tensor": "G",
    "torch.serialization _get_layout": "Y",
    "torch Size": "Z",
    "collections OrderedDict": "O",
    **{f"torch {name}": "S" for name in FLOAT_STORAGES},
    **{f"torch {name}": "I" for name in INDEX_STORAGES},
}
_OP_TOKENS = {
    "MARK": "(", "TUPLE": "t", "TUPLE1": "1", "TUPLE2": "2", "TUPLE3": "3", "EMPTY_TUPLE": ")",
    "BININT1": "i", "BININT2": "i", "BININT": "i", "LONG1": "i", "NEWTRUE": "b", "NEWFALSE": "b",
    "BINPERSID": "Q", "REDUCE": "R", "EMPTY_DICT": "d", "SETITEM": "s", "SETITEMS": "u",
    "STOP": ".",
}
_STRING_TOKENS = ((re.compile("storage"), "x"), (re.compile(r"[0-9]{1,9}"), "k"),
                  (re.compile("neg"), "n"), (re.compile(r"torch\.sparse_[a-z]{3}"), "y"),
                  (re.compile(r"[a-z]{1,16}(:[0-9]{1,4})?"), "l"))
# Tokens that push one value a later BINGET may push again.
_SINGLE_VALUES = frozenset("TAGYZOSIxknyl" "ib")

_INTS = r"(?:\)|i1|ii2|iii3|\(i*t)"


def _part(n: int) -> str:
    """One dense tensor, its groups suffixed with n. The conj bit exists for complex dtypes only,
    which are refused, so the only metadata is the neg bit."""
    return (rf"T\(\(x(?P<storage{n}>[SI])(?P<key{n}>k)l(?P<numel{n}>i)tQ(?P<offset{n}>i)"
            rf"(?P<size{n}>{_INTS})(?P<stride{n}>{_INTS})bO\)R"
            rf"(?P<meta{n}>d(?:nbs|\((?:nb)+u))?tR")


_DENSE = re.compile(rf"P(?P<param>A)?{_part(0)}(?(param)bO\)R3R)\.")
_SPARSE = re.compile(rf"PGY(?P<layout>y)1R\({_part(0)}{_part(1)}(?:{_part(2)})?"
                     rf"Z(?P<shape>{_INTS})1R(?P<coalesced>b)?t2R\.")


@dataclass(frozen=True)
class TensorPlan:
    """A dense tensor the pickle declares: a view of one storage record."""

    storage: str  # the storage class name, e.g. "FloatStorage"
    key: str      # its record is data/<key>
    numel: int    # elements in the storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    neg: bool = False  # torch's lazy negation bit

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_STORAGES.get(self.storage) or INDEX_STORAGES[self.storage]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.storage in FLOAT_STORAGES


@dataclass(frozen=True)
class SparsePlan:
    """A sparse tensor the pickle declares. parts: COO (indices, values); CSR (crow_indices,
    col_indices, values); CSC (ccol_indices, row_indices, values)."""

    layout: str  # "coo", "csr" or "csc"
    parts: tuple[TensorPlan, ...]
    size: tuple[int, ...]
    coalesced: bool = False


def read_plan(pickle_bytes: bytes) -> TensorPlan | SparsePlan:
    """What data.pkl would build, read opcode by opcode against what torch.save writes."""
    tokens, args = _pickle_tokens(pickle_bytes)
    text = "".join(tokens)
    if (match := _DENSE.fullmatch(text)) is not None:
        plan = _part_plan(match, tokens, args, 0)
        if not plan.is_float:
            raise _dtype_error(f"its data is a 'torch.{plan.storage}'")
        return plan
    if (match := _SPARSE.fullmatch(text)) is not None:
        return _sparse_plan(match, tokens, args)
    raise not_one_tensor("its data.pkl is not what torch.save writes for one")


def _ints(match: re.Match, group: str, tokens: list[str], args: list) -> tuple[int, ...]:
    return tuple(args[i] for i in range(*match.span(group)) if tokens[i] == "i")


def _part_plan(match: re.Match, tokens: list[str], args: list, n: int) -> TensorPlan:
    meta = match.span(f"meta{n}")
    flags = [args[i] for i in range(*meta) if tokens[i] == "b"] if meta[0] >= 0 else []
    return TensorPlan(storage=args[match.start(f"storage{n}")], key=args[match.start(f"key{n}")],
                      numel=_ints(match, f"numel{n}", tokens, args)[0],
                      offset=_ints(match, f"offset{n}", tokens, args)[0],
                      size=_ints(match, f"size{n}", tokens, args),
                      stride=_ints(match, f"stride{n}", tokens, args),
                      neg=bool(flags and flags[-1]))  # a repeated key: the last one wins


def _sparse_plan(match: re.Match, tokens: list[str], args: list) -> SparsePlan:
    name = args[match.start("layout")]
    layout = SPARSE_LAYOUTS.get(name)
    if layout is None:
        raise EmbedsError(f"prompt_embeds is a sparse tensor of layout {quote(name)}; sparse "
                          "prompt_embeds must be COO, CSR or CSC")
    count = 3 if match.start("storage2") >= 0 else 2
    coalesced = match.start("coalesced") >= 0
    if count != (2 if layout == "coo" else 3) or (coalesced and layout != "coo"):
        raise not_one_tensor(f"its data.pkl declares a {layout.upper()} tensor with {count} "
                             "parts, which torch.save does not write")
    parts = tuple(_part_plan(match, tokens, args, n) for n in range(count))
    *indices, values = parts
    if not values.is_float:
        raise _dtype_error(f"its values are a 'torch.{values.storage}'")
    if any(p.is_float or p.neg for p in indices):
        raise EmbedsError("prompt_embeds sparse indices must be int64 or int32 tensors")
    return SparsePlan(layout=layout, parts=parts, size=_ints(match, "shape", tokens, args),
                      coalesced=coalesced and bool(args[match.start("coalesced")]))


def _pickle_tokens(pickle_bytes: bytes) -> tuple[list[str], list]:
    tokens, args, memo = [], [], {}
    for opcode, arg, pos in pickletools.genops(pickle_bytes):
        if len(tokens) >= MAX_PICKLE_OPS:
            raise not_one_tensor(f"its data.pkl has more than {MAX_PICKLE_OPS} opcodes")
        name = opcode.name
        if name == "BINPUT":  # memo writes: what a later BINGET pushes
            single = tokens and tokens[-1] in _SINGLE_VALUES
            memo[arg] = (tokens[-1], args[-1]) if single else None
            continue
        if name == "BINGET" and memo.get(arg) is not None:
            token, value = memo[arg]
        else:
            token, value = _pickle_token(name, arg)
        tokens.append(token)
        args.append(value)
        if token == "." and pos != len(pickle_bytes) - 1:
            raise not_one_tensor("its data.pkl has bytes after its STOP opcode")
    return tokens, args


def _pickle_token(name: str, arg) -> tuple[str, object]:
    if name == "PROTO" and arg in (2, 3):  # torch's default; 3 writes the same opcodes here
        return "P", None
    if name == "GLOBAL":
        token = _GLOBAL_TOKENS.get(arg)
        if token is None:
            _refuse_global(*str(arg).partition(" ")[::2])
        return token, arg.partition(" ")[2]
    if name == "BINUNICODE":
        token = next((t for pattern, t in _STRING_TOKENS if pattern.fullmatch(arg)), "?")
        return token, arg
    if name in _OP_TOKENS:
        if name == "LONG1" and not -2 ** 63 <= arg < 2 ** 63:
            raise not_one_tensor("its data.pkl holds an integer out of 64-bit range")
        if name in ("NEWTRUE", "NEWFALSE"):
            arg = name == "NEWTRUE"
        return _OP_TOKENS[name], arg
    protocol = f" with protocol {quote(arg)}" if name == "PROTO" else ""
    raise not_one_tensor(f"its data.pkl uses the {name} opcode{protocol}, which torch.save "
                         "never writes for one")


def not_one_tensor(detail: str) -> EmbedsError:
    return EmbedsError("prompt_embeds must be a torch.Tensor saved with torch.save (one dense or "
                       f"sparse COO/CSR/CSC tensor, default pickle protocol): {detail}")


def _dtype_error(what: str) -> EmbedsError:
    return EmbedsError(f"prompt_embeds must be a floating tensor: {what}; prompt_embeds must be "
                       f"{FLOAT_DTYPES_TEXT}")


def _refuse_global(module: str, attr: str) -> None:
    if attr.endswith("Storage"):
        raise _dtype_error(f"its data is a {quote(module + '.' + attr)}")
    if "sparse" in attr:
        reason = (f"its pickle refers to {quote(module + '.' + attr)}; sparse tensors are "
                  "accepted as torch.save writes COO, CSR and CSC ones")
    elif "qtensor" in attr:
        reason = "it is a quantized tensor; prompt_embeds must be a plain floating tensor"
    elif "nested" in attr:
        reason = "it is a nested tensor; prompt_embeds must be a plain floating tensor"
    else:
        reason = f"its pickle refers to {quote(module + '.' + attr)}, which is not accepted"
    raise EmbedsError(f"prompt_embeds must be one floating tensor saved with torch.save: {reason}")
