"""Reading a KV bucket: once, correctly (nats-py's own markers race; see kv_values), or
followed into a dict of decoded values (:func:`mirror`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import TypeVar

import nats.errors
from nats.js.kv import KeyValue

__all__ = ["kv_values", "mirror"]

T = TypeVar("T")

log = logging.getLogger("mnemos.kv")

_SCAN_INACTIVE_S = 2.0
_SCAN_TIMEOUT_S = 5.0


async def kv_values(kv: KeyValue) -> AsyncIterator[tuple[str, bytes, int]]:
    """Every live ``(key, value, revision)`` of a bucket, read once (no updates after).

    The end of the snapshot is the first entry with nothing pending behind it, or the
    stream's last sequence read up front (so a bucket under constant writes still ends).
    nats-py's own "initial values done" marker is not used: it can arrive before values
    the server already sent. The one-shot consumer is dropped by the server 2 s after.
    """
    state = (await kv.status()).stream_info.state
    if not state.messages:
        return
    watcher = await kv.watchall(inactive_threshold=_SCAN_INACTIVE_S)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=_SCAN_TIMEOUT_S)  # type: ignore[no-untyped-call]
            except (TimeoutError, nats.errors.TimeoutError):
                log.warning("KV scan of %s ended by timeout", kv._name)  # noqa: SLF001
                return
            if entry is None or entry.revision is None:
                continue
            if entry.operation is None and entry.value:
                yield entry.key, entry.value, entry.revision
            if entry.delta == 0 or entry.revision >= state.last_seq:
                return
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def mirror(
    watcher: KeyValue.KeyWatcher,
    type: type[T],  # noqa: A002 - as decode's
    into: MutableMapping[str, T],
    *,
    prefix: str = "",
    on_change: Callable[[str, T | None, str | None], None] | None = None,
    loaded: asyncio.Event | None = None,
    empty: bool = False,
) -> None:
    """Keep ``into`` equal to the bucket's live keys (those starting with ``prefix``, which
    is cut off), decoded as ``type``, until cancelled. A malformed value is logged and
    skipped; ``on_change(key, value or None, operation)`` is called after each change
    (operation ``None`` for a value, ``DEL`` for a deletion, ``PURGE`` for a purge or an
    expiry). ``loaded`` is set once the bucket's contents at the start are in: at the first
    entry with nothing pending behind it (nats-py's own marker can come before values the
    server already sent), or at once when the caller knows the bucket was ``empty``."""
    from mnemos.errors import MnemosError
    from mnemos.messages import decode

    if loaded is not None and empty:
        loaded.set()
    try:
        async for entry in watcher:
            if entry is None:
                continue
            if loaded is not None and not loaded.is_set() and not entry.delta:
                loaded.set()
            if not entry.key.startswith(prefix):
                continue
            key = entry.key[len(prefix):]
            value: T | None = None
            if entry.operation is None and entry.value:
                try:
                    value = into[key] = decode(entry.value, type)
                except MnemosError as e:
                    log.warning("ignoring malformed %s entry %s: %s", type.__name__, entry.key, e)
                    continue
            else:
                into.pop(key, None)
            if on_change is not None:
                on_change(key, value, entry.operation)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
