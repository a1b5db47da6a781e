"""msgpack request bodies and responses (``Content-Type: application/msgpack``).

A msgpack body is the JSON body's twin; it may also carry prompt embeds as raw bytes
(see ``router.embeds.decode_raw_embeds``). Decoding is bounded by the body cap: every
length the payload declares (bin, str, array, map) is limited before msgpack allocates for it,
and extension types (msgpack's only route to custom objects) are refused.

Each body also has a budget of containers (maps and arrays) and of elements in them, sized to
what a real request needs: one byte of msgpack is a whole empty map, so a body cap alone lets a
4 MB body become millions of Python objects.
"""
from __future__ import annotations

from typing import Any

import msgpack

from router.errors import quote

MSGPACK_CONTENT_TYPE = "application/msgpack"


class MsgpackBodyError(ValueError):
    """A msgpack body the router refuses; ``status`` is the HTTP status (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


# Maps and arrays per body: per prompt a token-id list, or a raw embeds map with its shape list,
# plus the body's own few (prompt and stop lists, stream_options, chat messages and parts).
DEFAULT_MAX_CONTAINERS = 8192
# Array items and map entries per body, all containers together (e.g. 1024 prompts of 8192
# token ids); each is at least one byte of the body as well.
DEFAULT_MAX_ELEMENTS = 1 << 23
# Entries of one map: request maps have a few dozen keys at most.
MAX_MAP_LEN = 1024


def container_budget(max_prompts: int) -> int:
    """The containers a request of up to ``max_prompts`` prompts may need."""
    return 4 * max_prompts + 256


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MsgpackBodyError(f"msgpack extension types are not accepted (got type {code})")


class _Budget:
    """Counts each map and array as msgpack finishes it, and stops unpacking past the budget."""

    def __init__(self, containers: int, elements: int):
        self.containers, self.elements = containers, elements
        self.max_containers, self.max_elements = containers, elements

    def take(self, container):
        self.containers -= 1
        self.elements -= len(container)
        if self.containers < 0:
            raise MsgpackBodyError(f"msgpack body has more than {self.max_containers} maps and "
                                   "arrays, more than a request needs", status=413)
        if self.elements < 0:
            raise MsgpackBodyError(f"msgpack body has more than {self.max_elements} array items "
                                   "and map entries, more than a request needs", status=413)
        return container


def decode_msgpack_body(raw: bytes, max_bytes: int, *, max_containers: int = DEFAULT_MAX_CONTAINERS,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict:
    """Unpack a request body into a dict with string keys; 413 over a limit, else 400."""
    if len(raw) > max_bytes:
        raise MsgpackBodyError(f"request body is {len(raw)} bytes, the limit is {max_bytes} bytes",
                               status=413)
    if not raw:
        raise MsgpackBodyError("request body is empty; expected a msgpack map")
    # Every element of an array or map takes at least one byte of the body, so no honest body
    # declares more elements than it has bytes.
    limit = min(len(raw), max_bytes)
    budget = _Budget(max_containers, max_elements)
    try:
        body = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=limit, max_str_len=limit,
            max_array_len=min(limit, max_elements), max_map_len=min(limit // 2, MAX_MAP_LEN),
            max_ext_len=0, ext_hook=_refuse_ext,
            list_hook=budget.take, object_hook=budget.take)
    except MsgpackBodyError:
        raise
    except msgpack.ExtraData:
        raise MsgpackBodyError("request body holds more than one msgpack object") from None
    except UnicodeDecodeError:
        raise MsgpackBodyError("msgpack body has a string that is not valid UTF-8") from None
    except (RecursionError, msgpack.StackError):
        raise MsgpackBodyError("msgpack body is nested too deeply") from None
    except (ValueError, msgpack.UnpackException) as exc:
        # FormatError, OutOfData and "exceeds max_*_len" are ValueErrors.
        detail = quote(str(exc) or type(exc).__name__)
        raise MsgpackBodyError(f"request body is not valid msgpack: {detail}") from None
    if not isinstance(body, dict):
        raise MsgpackBodyError(f"msgpack body must be a map, got {type(body).__name__}")
    if not all(isinstance(k, str) for k in body):
        raise MsgpackBodyError("msgpack body keys must be strings")
    return body


def _default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # pydantic models (the response schemas)
        return obj.model_dump()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def encode_msgpack_response(obj: Any) -> bytes:
    """Pack a response (dicts, lists, pydantic models, numpy values) as msgpack."""
    return msgpack.packb(obj, use_bin_type=True, default=_default)
