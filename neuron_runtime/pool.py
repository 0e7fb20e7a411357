"""The in-memory tier of the warm cache: loaded models, LRU-bounded by count and memory.

A job asks the pool for (runtime, model, runtime config). A loaded model is a hit and costs
nothing; a miss fetches the artifacts through the disk cache (sha256-verified) and loads
them, once, however many jobs asked at the same time. Models in use are never evicted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from mnemos.catalog import ModelCatalog
from mnemos.errors import MnemosError, ModelLoadError
from mnemos.names import model_name
from mnemos.runtime_config import job_runtime_config
from neuron_runtime.cache import DiskCache
from neuron_runtime.runtimes.base import LoadedModel, Runtime

__all__ = ["ModelPool", "LoadInfo", "PoolKey"]

log = logging.getLogger("mnemos.pool")

PoolKey = tuple[str, str, str, str]  # runtime, family, version, canonical config overrides


@dataclass(frozen=True)
class LoadInfo:
    """How a job got its model: from memory (``hit``) or loaded now (``load_ms``)."""

    hit: bool
    load_ms: float
    disk_hit: bool | None = None


@dataclass
class _Entry:
    name: str
    model: LoadedModel
    slots: asyncio.Semaphore
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


_canonical: dict[Any, str] = {}


def pool_key(runtime: str, family: str, version: str, overrides: dict[str, Any]) -> PoolKey:
    """The pool's key for a job: its model and its runtime-config overrides, canonical."""
    return (runtime, family, version, _canonical_json(overrides))


def _canonical_json(overrides: dict[str, Any]) -> str:
    # Jobs repeat the same few overrides (a function name): remember flat ones' encodings.
    try:
        flat = tuple(sorted((k, type(v), v) for k, v in overrides.items()))  # 1, 1.0, True differ
        known = _canonical.get(flat)
    except TypeError:  # a nested or unorderable value: encode it each time
        return json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    if known is None:
        known = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
        if len(_canonical) < 4096:
            _canonical[flat] = known
    return known


class ModelPool:
    def __init__(
        self,
        runtimes: dict[str, Runtime],
        disk: DiskCache,
        catalog: ModelCatalog,
        *,
        max_models: int = 2,
        memory_budget_bytes: int | None = None,
        load_timeout_s: float = 600.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.runtimes = runtimes
        self.disk = disk
        self.catalog = catalog
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self.load_timeout_s = load_timeout_s
        self._loaded: OrderedDict[PoolKey, _Entry] = OrderedDict()
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        #: Called when the set of loaded models changed (the worker re-advertises it).
        self.on_change = on_change
        self.hits = 0
        self.misses = 0

    def is_loaded(self, key: PoolKey) -> bool:
        return key in self._loaded

    def loaded_names(self) -> list[str]:
        return sorted({e.name for e in self._loaded.values()})

    @asynccontextmanager
    async def use(self, key: PoolKey) -> AsyncIterator[tuple[LoadedModel, LoadInfo]]:
        """The loaded model for ``key`` (loading it if needed), held for one job."""
        entry = self._loaded.get(key)
        if entry is not None:
            self.hits += 1
            info = LoadInfo(hit=True, load_ms=0.0)
        else:
            entry, info = await self._load(key)
        entry.refs += 1
        try:
            async with entry.slots:
                entry.last_used = time.monotonic()
                self._loaded.move_to_end(key)
                yield entry.model, info
        finally:
            entry.refs -= 1
            entry.last_used = time.monotonic()

    async def _load(self, key: PoolKey) -> tuple[_Entry, LoadInfo]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._loaded.get(key)
            if entry is not None:  # another job loaded it while we waited
                self.hits += 1
                return entry, LoadInfo(hit=True, load_ms=0.0)
            self.misses += 1
            runtime_name, family, version, overrides_json = key
            runtime = self.runtimes.get(runtime_name)
            if runtime is None:
                raise ModelLoadError(f"this worker has no {runtime_name} runtime", retryable=True)
            record = await self.catalog.get(family, version)
            defaults = record.runtime_config if record.runtime == runtime_name else {}
            config = job_runtime_config(runtime_name, defaults, json.loads(overrides_json))
            started = time.perf_counter()
            try:
                async with self.disk.checkout(record) as cached:
                    model = await asyncio.wait_for(
                        runtime.load(record, cached.path, config), timeout=self.load_timeout_s
                    )
                    disk_hit = cached.hit
            except MnemosError:
                raise
            except TimeoutError as e:
                raise ModelLoadError(f"loading {family}:{version} took over {self.load_timeout_s}s") from e
            except Exception as e:
                raise ModelLoadError(f"loading {family}:{version} failed: {type(e).__name__}: {e}") from e
            load_ms = (time.perf_counter() - started) * 1000.0
            entry = _Entry(
                name=model_name(family, version),
                model=model,
                slots=asyncio.Semaphore(max(1, model.max_concurrency)),
            )
            self._loaded[key] = entry
            log.info("loaded %s on %s in %.0f ms (disk cache %s)", entry.name, runtime_name, load_ms,
                     "hit" if disk_hit else "miss")
            await self._evict(keep=key)
            if self.on_change is not None:
                self.on_change()
            return entry, LoadInfo(hit=False, load_ms=load_ms, disk_hit=disk_hit)

    def _over_budget(self) -> bool:
        if len(self._loaded) > self.max_models:
            return True
        if self.memory_budget_bytes is not None:
            return sum(e.model.memory_bytes for e in self._loaded.values()) > self.memory_budget_bytes
        return False

    async def _evict(self, keep: PoolKey) -> None:
        """Unload least-recently-used idle models until within budget."""
        while self._over_budget():
            victim = next((k for k, e in self._loaded.items() if k != keep and e.refs == 0), None)
            if victim is None:
                return
            entry = self._loaded.pop(victim)
            log.info("evicting %s (%s) from memory", entry.name, victim[0])
            await entry.model.unload()

    async def close(self) -> None:
        """Unload every model (worker shutdown)."""
        entries = list(self._loaded.values())
        self._loaded.clear()
        for entry in entries:
            try:
                await entry.model.unload()
            except Exception:
                log.exception("unloading %s failed", entry.name)
