"""Deployed apps as the control plane serves them: ``apps.*`` endpoints.

An app's code is a registry model ``<app>:<version>`` (the version is a hash of its
source, pushed by ``mnemos deploy``); its record in ``<ns>_apps`` names the live version
and what the source declares. Deploying makes a version live with one compare-and-set and
sizes the app's autoscaler pool (``app-<name>``) from the declared settings; deploying the
live version again changes nothing. Calls in flight keep the version they were submitted
with (a job names its model exactly), so a new version rolls out without failing them.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mnemos.catalog import ModelCatalog
from mnemos.connection import patiently
from mnemos.errors import AppNotFound, Conflict, ValidationFailed
from mnemos.kvscan import mirror
from mnemos.messages import AppDeployed, AppList, AppRecord, DeployApp, PoolSpec, decode, encode, utcnow
from mnemos.names import Names
from mnemos.runtime_config import PythonConfig, parse_runtime_config
from mnemos.tasks import Supervisor
from control_plane.pools import PoolDirectory

__all__ = ["AppDirectory", "app_pool"]

log = logging.getLogger("mnemos.control_plane.apps")


def app_pool(record: AppRecord, existing: PoolSpec | None) -> PoolSpec:
    """The pool an app's calls count for, sized from what its definitions declare: the
    largest ``min_workers``/``max_workers``/``scaledown_window`` any of them asks for, slots
    for the most concurrent calls (or batch) one of them takes. An existing pool keeps its
    provider and everything the definitions do not say (an operator may have set them)."""
    defs = record.definitions
    slots = max(max([d.max_concurrency, *(m.max_batch_size for m in d.methods if m.kind == "batched")])
                for d in defs)
    models = [record.model]
    if record.previous_version and record.previous_version != record.version:
        models.append(f"{record.name}:{record.previous_version}")  # its queued calls still count
    fields: dict[str, Any] = {
        "runtimes": ["python"],
        "models": models,
        "min_workers": max(d.min_workers for d in defs),
        "max_workers": max(d.max_workers for d in defs),
        "worker_slots": max(slots, 1),
        "target_concurrency": None,
        "scaledown_window_s": max(d.scaledown_window for d in defs),
        "description": f"calls of app {record.name} (mnemos deploy)",
    }
    if existing is None:
        return PoolSpec(name=Names.app_pool(record.name), provider="local", **fields)
    return msgspec.structs.replace(existing, **fields)


class AppDirectory:
    """App records, followed from their bucket; deploys write through it."""

    def __init__(self, apps: KeyValue, catalog: ModelCatalog, pools: PoolDirectory) -> None:
        self.kv = apps
        self.catalog = catalog
        self.pools = pools
        self.records: dict[str, AppRecord] = {}

    async def _ensure_pool(self, record: AppRecord) -> None:
        existing = self.pools.specs.get(Names.app_pool(record.name))
        wanted = app_pool(record, existing)
        if wanted != existing:
            await self.pools.set(wanted)

    async def start(self, supervisor: Supervisor) -> None:
        watcher = await patiently(self.kv.watchall, "watch the apps bucket")
        supervisor.spawn("apps", mirror(watcher, AppRecord, self.records))

    def list(self) -> AppList:
        return AppList(apps=[self.records[name] for name in sorted(self.records)])

    async def get(self, name: str) -> AppRecord:
        record = self.records.get(name)
        if record is not None:
            return record
        try:  # read through: one deployed a moment ago counts before the mirror has it
            entry = await self.kv.get(name)
        except Exception:  # noqa: BLE001 - KeyNotFoundError / KeyDeletedError
            raise AppNotFound(f"no app {name!r} is deployed (mnemos deploy APP.py)") from None
        return decode(entry.value or b"", AppRecord)

    async def deploy(self, body: DeployApp) -> AppDeployed:
        model = await self.catalog.resolve(f"{body.name}:{body.version}")
        config = parse_runtime_config(model.runtime, model.runtime_config)
        if not isinstance(config, PythonConfig) or config.isolation != "process":
            raise ValidationFailed(f"model {model.name} is not an app (a python model with isolation 'process')")
        declared = {t for d in body.definitions for t in d.targets}
        if declared != set(config.functions):
            raise ValidationFailed(f"the definitions call {sorted(declared)} but {model.name} declares "
                                   f"{sorted(config.functions)}", details={"path": "$.definitions"})
        try:
            entry = await self.kv.get(body.name)
            current: AppRecord | None = decode(entry.value or b"", AppRecord)
            revision = entry.revision or 0
        except KeyNotFoundError:  # not deployed yet (or removed)
            current, revision = None, 0
        if current is not None and current.version == body.version and current.definitions == body.definitions:
            await self._ensure_pool(current)  # a deploy whose pool write failed is mended by the next
            return AppDeployed(app=current, changed=False, revision=revision)
        previous = None if current is None or current.version == body.version else current.version
        record = AppRecord(name=body.name, version=body.version, definitions=body.definitions,
                           deployed_at=utcnow(), previous_version=previous, pool=Names.app_pool(body.name),
                           requirements=list(config.requirements))
        pool = app_pool(record, self.pools.specs.get(Names.app_pool(body.name)))
        pool = await self.pools.validate(pool)  # before the record: a refused pool deploys nothing
        try:
            if current is None:
                revision = await self.kv.create(body.name, encode(record))
            else:
                revision = await self.kv.update(body.name, encode(record), last=revision)
        except KeyWrongLastSequenceError as e:  # another deploy won the compare-and-set
            raise Conflict(f"app {body.name} was deployed concurrently; deploy again") from e
        self.records[body.name] = record
        await self.pools.set(pool)
        log.info("deployed %s (was %s); pool %s %d..%d", record.model, previous or "none", pool.name,
                 pool.min_workers, pool.max_workers)
        return AppDeployed(app=record, changed=True, revision=revision)
