"""Creating (idempotently) the JetStream streams and KV buckets of one namespace.

Every process calls :func:`ensure_layout` at start; creating something that exists with the
same configuration is a no-op on the server, so any number of processes may race here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from mnemos.connection import patiently
from mnemos.names import Names

__all__ = ["LayoutOptions", "Layout", "ensure_layout"]

log = logging.getLogger("mnemos.layout")


@dataclass(frozen=True)
class LayoutOptions:
    replicas: int = 1
    #: How long finished job records and result streams are kept.
    job_retention_s: float = 7 * 24 * 3600
    results_retention_s: float = 24 * 3600
    #: Result streams are bounded by size too; the oldest messages go first.
    results_max_bytes: int = 4 * 2**30
    idempotency_window_s: float = 24 * 3600


@dataclass
class Layout:
    """Handles on the buckets of one namespace."""

    names: Names
    jobs: KeyValue
    workers: KeyValue
    models: KeyValue
    idempotency: KeyValue
    #: Autoscaler pools (``PoolSpec`` by pool name) and the autoscaler's own state
    #: (its leader lease and each pool's status).
    pools: KeyValue
    autoscaler: KeyValue
    #: Deployed apps (``AppRecord`` by app name: the live version and its definitions).
    apps: KeyValue
    #: Actors' activations and checkpoints.
    actors: KeyValue
    #: Tenants' quotas (``TenantQuota`` by tenant).
    tenants: KeyValue


async def _ensure_stream(js: JetStreamContext, config: jsapi.StreamConfig, update: bool) -> None:
    async def step() -> None:
        try:
            await js.add_stream(config)
        except BadRequestError as e:
            if e.err_code != 10058:  # name in use with a different configuration
                raise
            if update:
                log.info("stream %s exists with another configuration; updating it", config.name)
                await js.update_stream(config)

    await patiently(step, f"set up stream {config.name}")


async def _ensure_kv(js: JetStreamContext, config: jsapi.KeyValueConfig) -> KeyValue:
    async def step() -> KeyValue:
        try:
            return await js.key_value(config.bucket)
        except (BucketNotFoundError, NotFoundError):
            pass
        try:
            return await js.create_key_value(config)
        except BadRequestError as e:
            if e.err_code != 10058:
                raise
            return await js.key_value(config.bucket)

    return await patiently(step, f"set up bucket {config.bucket}")


async def ensure_layout(
    js: JetStreamContext, names: Names, options: LayoutOptions | None = None, *, owner: bool = False
) -> Layout:
    """Create the namespace's streams and buckets if missing and return the KV handles.

    Only the ``owner`` (the control plane, which reads the retention settings) changes an
    existing stream's configuration; every other process takes what it finds.
    """
    o = options or LayoutOptions()
    # One round trip of wall time, not ten: the streams and buckets are independent.
    streams = asyncio.gather(
        _ensure_stream(
            js,
            jsapi.StreamConfig(
                name=names.dispatch_stream,
                description="MNEMOS job dispatch: <runtime>.<priority>.<model>, pulled by workers",
                subjects=[names.dispatch_all],
                retention=jsapi.RetentionPolicy.WORK_QUEUE,
                storage=jsapi.StorageType.FILE,
                discard=jsapi.DiscardPolicy.NEW,
                num_replicas=o.replicas,
                duplicate_window=120.0,
                allow_direct=True,
            ),
            owner,
        ),
        _ensure_stream(
            js,
            jsapi.StreamConfig(
                name=names.results_stream,
                description="MNEMOS result chunks and final messages per job",
                subjects=[names.results_all],
                retention=jsapi.RetentionPolicy.LIMITS,
                discard=jsapi.DiscardPolicy.OLD,
                max_bytes=o.results_max_bytes,
                storage=jsapi.StorageType.FILE,
                max_age=o.results_retention_s,
                num_replicas=o.replicas,
                duplicate_window=120.0,
                allow_direct=True,
            ),
            owner,
        ),
    )
    buckets = asyncio.gather(
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.jobs_bucket,
                description="MNEMOS job records",
                history=1,
                ttl=o.job_retention_s,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                # Direct gets may be answered by a replica that lags the leader; job records are
                # read right before a compare-and-set and after a write, so with replicas they
                # are read from the leader.
                direct=o.replicas == 1,
                # A record that ages out leaves a marker, so watchers (the control plane's job
                # index) see it go.
                limit_marker_ttl=300.0,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.workers_bucket,
                description="MNEMOS workers (each key expires when its heartbeats stop)",
                history=1,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=True,
                limit_marker_ttl=60.0,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.models_bucket,
                description="MNEMOS model registry",
                history=5,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=True,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.idempotency_bucket,
                description="MNEMOS idempotency keys -> job ids",
                history=1,
                ttl=o.idempotency_window_s,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=True,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.pools_bucket,
                description="MNEMOS autoscaler pools (settings; mnemos pools set/rm)",
                history=5,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=o.replicas == 1,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.autoscaler_bucket,
                description="MNEMOS autoscaler state: the leader lease (expires unless renewed), pool status",
                history=1,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                # The lease is read right before its compare-and-set: from the leader.
                direct=o.replicas == 1,
                # Per-key TTLs (the lease), and a marker when one expires.
                limit_marker_ttl=60.0,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.apps_bucket,
                description="MNEMOS deployed apps (live version and definitions; mnemos deploy)",
                history=5,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=o.replicas == 1,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.actors_bucket,
                description="MNEMOS actors: act.<token> the live activation, state.<token> its checkpoint",
                history=1,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                # An activation is read right before its compare-and-set: from the leader.
                direct=o.replicas == 1,
            ),
        ),
        _ensure_kv(
            js,
            jsapi.KeyValueConfig(
                bucket=names.tenants_bucket,
                description="MNEMOS tenants' quotas (mnemos tenants set/rm)",
                history=5,
                storage=jsapi.StorageType.FILE,
                replicas=o.replicas,
                direct=o.replicas == 1,
            ),
        ),
    )
    _, (jobs, workers, models, idempotency, pools, autoscaler, apps, actors, tenants) = await asyncio.gather(
        streams, buckets)
    return Layout(names=names, jobs=jobs, workers=workers, models=models, idempotency=idempotency,
                  pools=pools, autoscaler=autoscaler, apps=apps, actors=actors, tenants=tenants)
