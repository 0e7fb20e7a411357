"""The autoscaler's pools as the control plane serves them: ``pools.*`` endpoints, and the
pool behind a waiting job.

Pools live in ``<ns>_pools`` (settings, one key per pool) and their status in
``<ns>_autoscaler`` (``status.<pool>``, written by the acting autoscaler). The control plane
follows both, validates what ``pools.set`` stores (one pool per runtime for every model,
one per named model, models that exist and run on the pool's runtimes, bounds that make
sense) and says, for a queued job, which pool would serve it and what it is doing.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KeyValue

from mnemos.catalog import ModelCatalog
from mnemos.connection import patiently
from mnemos.errors import Conflict, PoolNotFound, ValidationFailed
from mnemos.kvscan import mirror
from mnemos.messages import PoolList, PoolSpec, PoolStatus, PoolView, decode, encode
from mnemos.names import Names
from mnemos.pools import pool_for
from mnemos.tasks import Supervisor

__all__ = ["PoolDirectory"]

log = logging.getLogger("mnemos.control_plane.pools")


class PoolDirectory:
    """Pool settings and statuses, followed from their buckets."""

    def __init__(self, pools: KeyValue, autoscaler: KeyValue, catalog: ModelCatalog) -> None:
        self.pools_kv = pools
        self.autoscaler_kv = autoscaler
        self.catalog = catalog
        self.specs: dict[str, PoolSpec] = {}
        self.statuses: dict[str, PoolStatus] = {}

    async def start(self, supervisor: Supervisor) -> None:
        specs = await patiently(self.pools_kv.watchall, "watch the pools bucket")
        statuses = await patiently(self.autoscaler_kv.watchall, "watch the autoscaler bucket")
        supervisor.spawn("pools", mirror(specs, PoolSpec, self.specs))
        prefix = Names.pool_status_key("")
        supervisor.spawn("pool-status", mirror(statuses, PoolStatus, self.statuses, prefix=prefix))

    # ------------------------------------------------------------------ endpoints

    def list(self) -> PoolList:
        return PoolList(pools=[PoolView(spec=spec, status=self.statuses.get(name))
                               for name, spec in sorted(self.specs.items())])

    async def get(self, name: str) -> PoolView:
        try:
            entry = await self.pools_kv.get(name)
        except Exception:  # noqa: BLE001 - KeyNotFoundError / KeyDeletedError
            raise PoolNotFound(f"no pool {name!r}") from None
        spec = decode(entry.value or b"", PoolSpec)
        return PoolView(spec=spec, status=self.statuses.get(name), revision=entry.revision or 0)

    async def set(self, spec: PoolSpec) -> PoolView:
        spec = await self.validate(spec)
        revision = await self.pools_kv.put(spec.name, encode(spec))
        self.specs[spec.name] = spec
        return PoolView(spec=spec, status=self.statuses.get(spec.name), revision=revision)

    async def delete(self, name: str) -> PoolView:
        view = await self.get(name)
        await self.pools_kv.delete(name)
        self.specs.pop(name, None)
        return view

    async def validate(self, spec: PoolSpec) -> PoolSpec:
        """``spec`` with its models named canonically, or why it cannot be stored."""
        if spec.min_workers > spec.max_workers:
            raise ValidationFailed(f"min_workers ({spec.min_workers}) is above max_workers ({spec.max_workers})",
                                   details={"path": "$.pool.min_workers"})
        if len(set(spec.runtimes)) != len(spec.runtimes):
            raise ValidationFailed("a runtime is named twice", details={"path": "$.pool.runtimes"})
        if spec.target_concurrency is not None and spec.target_concurrency > spec.worker_slots:
            raise ValidationFailed(
                f"target_concurrency ({spec.target_concurrency}) is above worker_slots ({spec.worker_slots}): "
                "a worker never runs more jobs than its slots", details={"path": "$.pool.target_concurrency"})
        models: list[str] = []
        for name in spec.models:
            record = await self.catalog.resolve(name)  # read through: one just pushed counts
            if record.runtime not in spec.runtimes:
                raise ValidationFailed(f"model {name!r} runs on {record.runtime}, which the pool does not serve",
                                       details={"path": "$.pool.models"})
            models.append(f"{record.family}:{record.version}")
        existing = self.specs.get(spec.name)
        if existing is not None and (existing.provider, existing.provider_settings) != (
                spec.provider, spec.provider_settings):
            raise Conflict(f"pool {spec.name!r} runs on {existing.provider} {existing.provider_settings or ''}: "
                           "remove it first (its workers drain), then create it with the new provider")
        for other in self.specs.values():
            if other.name == spec.name:
                continue
            shared = set(other.runtimes) & set(spec.runtimes)
            if not shared:
                continue
            if not other.models and not spec.models:
                raise Conflict(f"pool {other.name!r} already serves every model of {', '.join(sorted(shared))}; "
                               "a job must count for one pool (name models to make a pool for them)")
            both = set(other.models) & set(models)
            if both:
                raise Conflict(f"pool {other.name!r} already serves {', '.join(sorted(both))}")
        return msgspec.structs.replace(spec, models=models)

    # ------------------------------------------------------------------ waiting jobs

    def serving(self, runtime: str, model: str) -> tuple[PoolSpec, PoolStatus | None] | None:
        """The pool a job of ``runtime`` for ``model`` counts for, with its status."""
        pool = pool_for(self.specs.values(), runtime, model)
        return None if pool is None else (pool, self.statuses.get(pool.name))
