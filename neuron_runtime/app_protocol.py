"""What a worker and its app process say to each other over their socket pair.

Frames are msgpack (msgspec, tagged) behind a 4-byte big-endian length. The worker sends
calls, cancels and answers to the child's model-directory requests; the child answers each
call with streamed items and exactly one of done / failed / cancelled. Only the worker and
the child (``neuron_runtime.app_child``) speak it, and they always come from one install.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec
from msgspec import Struct

__all__ = [
    "Call", "Cancel", "PathReply", "Activate", "Deactivated", "Ready", "Item", "Done", "Failed", "Cancelled",
    "PathRequest", "ToChild", "ToParent", "FrameTooLarge", "write_frame", "read_frame",
]

#: The largest frame either side accepts (a NATS message is smaller still).
MAX_FRAME = 64 * 2**20


class _Frame(Struct, tag_field="t", forbid_unknown_fields=True):
    pass


class Call(_Frame, tag="call"):
    id: int
    target: str
    args: list[Any]
    kwargs: dict[str, Any]


class Cancel(_Frame, tag="cancel"):
    id: int


class PathReply(_Frame, tag="path_reply"):
    id: int
    path: str | None = None
    error: str | None = None


class Activate(_Frame, tag="activate"):
    """Host the actor ``cls``/``key``: answer calls on ``subject`` (the child's own NATS
    connection), checkpoint to ``state_key`` (compare-and-set from ``state_revision``) and
    remove ``activation_key`` (at ``activation_revision``) when deactivated."""

    id: int
    cls: str
    key: str
    token: str
    subject: str
    activation_key: str
    activation_revision: int
    state_key: str
    state_revision: int
    #: The last checkpoint's state (restored without ``__init__``); absent: a new actor.
    has_state: bool = False
    state: Any = None
    calls: int = 0


class Deactivated(_Frame, tag="deactivated"):
    token: str
    reason: str


class Ready(_Frame, tag="ready"):
    pid: int
    import_ms: float


class Item(_Frame, tag="item"):
    id: int
    value: Any


class Done(_Frame, tag="done"):
    id: int
    result: Any
    exec_ms: float
    #: Time this call waited for its class's ``@enter`` (None: the instance was entered).
    load_ms: float | None = None
    #: A batched method's batch: how many calls it held and which one it was.
    batch_size: int | None = None
    batch_id: int | None = None


class Failed(_Frame, tag="failed"):
    id: int
    #: The :mod:`mnemos.errors` code the worker raises (``execution_error``, ``model_load_error``).
    code: str
    message: str
    exception_type: str = ""
    traceback: str = ""
    retryable: bool = False


class Cancelled(_Frame, tag="cancelled"):
    id: int


class PathRequest(_Frame, tag="path"):
    id: int
    model: str


ToChild = Call | Cancel | PathReply | Activate
ToParent = Ready | Item | Done | Failed | Cancelled | PathRequest | Deactivated

_encoder = msgspec.msgpack.Encoder()
_to_child = msgspec.msgpack.Decoder(ToChild)
_to_parent = msgspec.msgpack.Decoder(ToParent)
_LEN = struct.Struct(">I")


class FrameTooLarge(ValueError):
    """A frame over :data:`MAX_FRAME` (never sent: the reader would take it for garbage)."""


def write_frame(writer: asyncio.StreamWriter, frame: _Frame) -> None:
    """Queue ``frame`` on ``writer`` (the event loop's thread only)."""
    data = _encoder.encode(frame)
    if len(data) > MAX_FRAME:
        raise FrameTooLarge(f"{len(data)} bytes, over the {MAX_FRAME} byte limit")
    writer.write(_LEN.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader, *, parent: bool) -> Any:
    """The next frame (``parent``: read by the worker), or None at the end of the stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"app process frame of {size} bytes is over the {MAX_FRAME} limit")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    return (_to_parent if parent else _to_child).decode(data)
