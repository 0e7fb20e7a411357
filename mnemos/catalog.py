"""A live, in-memory view of the model registry (``mnemos_models``), kept by a KV watch.

The control plane validates every submitted job against it and workers look up artifact
locations in it, so neither pays a KV round trip per job.
"""

from __future__ import annotations

import asyncio
import logging
import re

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from mnemos.connection import patiently
from mnemos.errors import ModelNotFound, ValidationFailed
from mnemos.messages import ModelRecord, decode
from mnemos.names import model_key
from mnemos.tasks import Supervisor

__all__ = ["ModelCatalog"]

log = logging.getLogger("mnemos.catalog")

_FAMILY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(\.[A-Za-z0-9-]+)*$")
_TASK = "model-catalog"


class ModelCatalog:
    """Model records by ``family.version`` key and by alias, updated as the bucket changes."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._by_key: dict[str, ModelRecord] = {}
        self._aliases: dict[str, str] = {}
        self._supervisor: Supervisor | None = None
        self._ready = asyncio.Event()

    async def start(self, supervisor: Supervisor) -> None:
        """Load every record and keep following changes, as ``supervisor``'s task
        ``model-catalog`` (a watch that dies is the component's fatal error: its view of the
        registry would silently go stale). Safe to call twice."""
        if self._supervisor is not None:
            return
        empty = not (await patiently(self._kv.status, "read the models bucket")).stream_info.state.messages
        watcher = await patiently(self._kv.watchall, "watch the models bucket")
        self._supervisor = supervisor
        supervisor.spawn(_TASK, self._follow(watcher))
        if empty:
            self._ready.set()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=10.0)
        except TimeoutError:
            log.warning("model catalog: initial values not confirmed within 10 s; continuing")

    async def stop(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.stop(_TASK)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                # nats-py's None "initial values done" marker can come before values the
                # server already sent; an entry with nothing pending behind it cannot.
                if entry is None:
                    continue
                if entry.operation is not None or not entry.value:
                    self._by_key.pop(entry.key, None)
                else:
                    try:
                        self._by_key[entry.key] = decode(entry.value, ModelRecord)
                    except ValidationFailed as e:
                        log.error("ignoring malformed model record %s: %s", entry.key, e)
                self._rebuild_aliases()
                if entry.delta == 0:
                    self._ready.set()
        finally:
            self._ready.set()
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _rebuild_aliases(self) -> None:
        self._aliases = {a: k for k, rec in self._by_key.items() for a in rec.aliases}

    def list(self) -> list[ModelRecord]:
        return sorted(self._by_key.values(), key=lambda m: (m.family, m.version))

    def find(self, name: str) -> ModelRecord | None:
        """By ``family:version``, ``family.version`` key, or alias."""
        if name in self._aliases:
            return self._by_key.get(self._aliases[name])
        if ":" in name:
            family, _, version = name.partition(":")
            return self._by_key.get(model_key(family, version))
        return self._by_key.get(name)

    @staticmethod
    def valid_ref(family: str, version: str) -> bool:
        """Whether ``family``/``version`` can name a model at all (and so a KV key)."""
        return bool(_FAMILY_RE.match(family) and _VERSION_RE.match(version) and len(version) <= 64)

    async def get(self, family: str, version: str) -> ModelRecord:
        """The record, from memory or (if the watch has not caught up yet) from KV."""
        if not self.valid_ref(family, version):
            raise ModelNotFound(f"{family}:{version} is not a valid model name")
        key = model_key(family, version)
        rec = self._by_key.get(key)
        if rec is not None:
            return rec
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as e:
            raise ModelNotFound(f"model {family}:{version} is not registered") from e
        if not entry.value:
            raise ModelNotFound(f"model {family}:{version} is not registered")
        rec = decode(entry.value, ModelRecord)
        self._by_key[key] = rec
        return rec

    async def resolve(self, name: str) -> ModelRecord:
        rec = self.find(name)
        if rec is None and ":" in name:
            family, _, version = name.partition(":")
            return await self.get(family, version)
        if rec is None:
            raise ModelNotFound(f"model {name!r} is not registered")
        return rec
