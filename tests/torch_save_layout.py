"""torch.save archives taken apart and rebuilt field by field, for tests that attack the decoder.

``build`` writes the zip layout torch.save writes (64-byte aligned records padded with an "FB"
extra field, data descriptors, zip64 end records), or the plainer layout Python's zipfile writes,
and returns every header field's place so that a test can change one field and nothing else.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

import torch

LOCAL = ("<IHHHHHIIIHH", ("sig", "version", "flags", "method", "time", "date", "crc", "csize",
                          "usize", "name_len", "extra_len"))
CENTRAL = ("<IHHHHHHIIIHHHHHII", ("sig", "made_by", "version", "flags", "method", "time", "date",
                                  "crc", "csize", "usize", "name_len", "extra_len", "comment_len",
                                  "disk", "int_attr", "ext_attr", "offset"))
DESCRIPTOR = ("<IIII", ("sig", "crc", "csize", "usize"))
ZIP64_END = ("<IQHHIIQQQQ", ("sig", "size", "made_by", "version", "disk", "cd_disk", "n_disk",
                             "n_total", "cd_size", "cd_offset"))
ZIP64_LOCATOR = ("<IIQI", ("sig", "disk", "offset", "disks"))
END = ("<IHHHHIIH", ("sig", "disk", "cd_disk", "n_disk", "n_total", "cd_size", "cd_offset",
                     "comment_len"))


@dataclass(frozen=True)
class Field:
    """One integer field of a zip header: where it lies and how wide it is."""

    label: str
    offset: int
    fmt: str  # a struct format letter: H, I or Q

    @property
    def bits(self) -> int:
        return 8 * struct.calcsize(self.fmt)


@dataclass
class Archive:
    raw: bytes
    fields: list[Field] = field(default_factory=list)
    names: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of each name

    def with_field(self, f: Field, value: int) -> bytes:
        out = bytearray(self.raw)
        struct.pack_into("<" + f.fmt, out, f.offset, value % (1 << f.bits))
        return bytes(out)


class _Writer:
    def __init__(self):
        self.out = bytearray()
        self.fields: list[Field] = []
        self.names: list[tuple[int, int]] = []

    def name(self, name_b: bytes) -> None:
        self.names.append((len(self.out), len(name_b)))
        self.out += name_b

    def header(self, layout: tuple[str, tuple[str, ...]], label: str, *values: int) -> None:
        fmt, names = layout
        pos = len(self.out)
        self.out += struct.pack(fmt, *values)
        offset = pos
        for letter, name in zip(fmt[1:], names):
            self.fields.append(Field(f"{label}.{name}", offset, letter))
            offset += struct.calcsize(letter)


def build(records: list[tuple[str, bytes]], *, torch_layout: bool = True) -> Archive:
    """A zip of ``records`` (name, data), stored, in the order given.

    torch_layout: as torch.save writes it; else as zipfile.ZipFile.writestr does (sizes in the
    local headers, no padding, no descriptors, no zip64 end records).
    """
    w = _Writer()
    version = 0 if torch_layout else 20
    offsets, all_flags = [], []
    for i, (name, data) in enumerate(records):
        offsets.append(len(w.out))
        name_b, crc = name.encode(), zlib.crc32(data)
        descriptor = torch_layout and len(data) > 0  # torch writes none after an empty record
        flags = (0x0800 if torch_layout else 0) | (0x0008 if descriptor else 0)
        all_flags.append(flags)
        pad = (-(len(w.out) + 30 + len(name_b) + 4)) % 64 if torch_layout else None
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad if torch_layout else b""
        local_sizes = (0, 0, 0) if descriptor else (crc, len(data), len(data))
        w.header(LOCAL, f"local[{i}]", 0x04034B50, version, flags, 0, 0, 0, *local_sizes,
                 len(name_b), len(extra))
        w.name(name_b)
        w.out += extra + data
        if descriptor:
            w.header(DESCRIPTOR, f"descriptor[{i}]", 0x08074B50, crc, len(data), len(data))
    cd_offset = len(w.out)
    for i, ((name, data), offset, flags) in enumerate(zip(records, offsets, all_flags)):
        name_b = name.encode()
        w.header(CENTRAL, f"central[{i}]", 0x02014B50, 0 if torch_layout else 20, version, flags,
                 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name_b), 0, 0, 0, 0, 0,
                 offset)
        w.name(name_b)
    cd_size, n = len(w.out) - cd_offset, len(records)
    if torch_layout:
        end64 = len(w.out)
        w.header(ZIP64_END, "zip64_end", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset)
        w.header(ZIP64_LOCATOR, "zip64_locator", 0x07064B50, 0, end64, 1)
    w.header(END, "end", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0)
    return Archive(bytes(w.out), w.fields, w.names)


def saved(obj, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **save_kwargs)
    return buf.getvalue()


def records_of(raw: bytes) -> list[tuple[str, bytes]]:
    """The (name, data) records of an archive, in order."""
    z = zipfile.ZipFile(io.BytesIO(raw))
    return [(info.filename, z.read(info)) for info in z.infolist()]


def with_pickle(records: list[tuple[str, bytes]], pickle_bytes: bytes) -> list[tuple[str, bytes]]:
    return [(n, pickle_bytes if n.endswith("/data.pkl") else d) for n, d in records]


def pickle_ops(pickle_bytes: bytes) -> list[bytes]:
    """A pickle cut into its opcodes (each with its argument), in order."""
    starts = [pos for _op, _arg, pos in pickletools.genops(pickle_bytes)]
    return [pickle_bytes[a:b] for a, b in zip(starts, starts[1:] + [len(pickle_bytes)])]


# --- payloads of the attack classes in issue 10 (each was accepted or crashed before) ----------

def legacy_bytearray_bomb(nbytes: int = 1 << 30) -> bytes:
    """A legacy (non-zip) torch.save stream whose object is bytearray(nbytes): ~170 bytes."""
    legacy = saved(torch.zeros(1), _use_new_zipfile_serialization=False)
    f, heads = io.BytesIO(legacy), []
    for _ in range(3):  # magic number, protocol version, sys info
        start = f.tell()
        pickle.load(f)
        heads.append(legacy[start:f.tell()])
    obj = b"\x80\x02cbuiltins\nbytearray\nJ" + struct.pack("<i", nbytes) + b"\x85R."
    return b"".join(heads) + obj + b"\x80\x02]q\x00."


def case_collision(raw: bytes, evil_pickle: bytes) -> bytes:
    """``raw``'s records with its data.pkl moved to a subfolder and archive/DATA.PKL beside it:
    torch looks data.pkl up ignoring case."""
    records = [(n.replace("/data.pkl", "/x/data.pkl"), d) for n, d in records_of(raw)]
    top = records[0][0].split("/")[0]
    return build(records + [(f"{top}/DATA.PKL", evil_pickle)]).raw


def opcode_flood(raw: bytes, op: bytes, count: int) -> bytes:
    """``raw`` with ``count`` one-byte opcodes after its pickle's PROTO: still a valid pickle."""
    records = records_of(raw)
    ops = pickle_ops(next(d for n, d in records if n.endswith("/data.pkl")))
    return build(with_pickle(records, ops[0] + op * count + b"".join(ops[1:]))).raw
