"""``mnemos autoscaler``: keeps every pool as big as its work, down to zero.

Stateless apart from NATS. Any number run; the one that holds the lease
(:mod:`~control_plane.autoscaler.lease`) acts, every ``tick_s``:

1. What the pools' subjects hold: one ``STREAM.INFO`` of the dispatch stream with a subject
   filter gives the messages per ``<runtime>.<priority>.<model>`` (queued or running jobs).
   A message counts for the most specific pool: one naming its model, else one serving its
   runtime. The workers come from a watch of the workers bucket; a worker belongs to the
   pool its ``pool`` tag names.
2. What each pool's provider runs, joined with the worker records: a worker is
   ``starting`` (asked for, not registered), ``ready`` (idle or busy) or ``draining``.
3. :func:`~control_plane.autoscaler.policy.plan` says how many it should have. Up: the
   provider starts them in the same tick. Down (after the scale-down window): idle workers
   only, each asked to ``drain_if_idle`` -- a worker that has just taken a job refuses and
   keeps working -- and each is stopped by the provider only after it has deregistered.
4. A worker the provider itself is taking away (``terminating``: an AWS lifecycle hook) is
   told to drain; once it has deregistered the provider is told it may go.

Everything it decides goes into the pool's status (``<ns>_autoscaler`` ``status.<pool>``),
with what it saw, what it asked for and what came of it, and into metrics. A new leader
reads the statuses back, so a worker another instance started is neither started again
nor forgotten, and the scale-down window goes on where it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS

from control_plane.autoscaler.config import AutoscalerSettings
from control_plane.backpressure import dispatch_subject_counts
from control_plane.autoscaler.lease import Lease
from control_plane.autoscaler.metrics import AutoscalerMetrics
from control_plane.autoscaler.policy import plan
from control_plane.autoscaler.providers import Provider, ProviderError, WorkerLaunch, make_provider
from control_plane.autoscaler.providers.base import ProviderView
from mnemos.config import NatsSettings
from mnemos.connection import patiently
from mnemos.environment import CREDS_VARIABLE
from mnemos.kvscan import mirror
from mnemos.layout import Layout, ensure_layout
from mnemos.messages import (
    DesiredPoint,
    PoolSpec,
    PoolStatus,
    PoolWorker,
    ScalingDecision,
    WorkerCommand,
    WorkerRecord,
    decode,
    encode,
    utcnow,
)
from mnemos.metrics import METRICS_DISABLED, MetricsServer, serve_metrics
from mnemos.names import Names
from mnemos.pools import pool_for
from mnemos.tasks import Supervisor, next_round

__all__ = ["Autoscaler", "worker_launch_env"]

log = logging.getLogger("mnemos.autoscaler")

#: Worker record statuses that count as ready, starting and draining.
_READY = ("idle", "busy", "paused")
_STARTING = ("registering", "starting")
#: The detail of a worker whose record expired (no heartbeat): it may come back.
_SILENT = "no heartbeat: its record expired"


class _LeaseLost(Exception):
    """The lease lapsed during a round: stop acting before the next provider call."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def worker_launch_env(pool: PoolSpec, nats: NatsSettings, worker_creds: str | None = None) -> dict[str, str]:
    """The settings a worker of ``pool`` is started with (the ``local`` provider's process
    environment; the ``aws`` boot script sets the same from the launch template): the
    workers' own credentials (``worker_creds``), else the autoscaler's."""
    env = {
        "MNEMOS_NATS_URL": nats.nats_url,
        "MNEMOS_NAMESPACE": nats.namespace,
        "MNEMOS_WORKER_RUNTIMES": ",".join(pool.runtimes),
        "MNEMOS_WORKER_MAX_CONCURRENT_JOBS": str(pool.worker_slots),
        "MNEMOS_WORKER_TAGS": f"pool={pool.name},provider={pool.provider}",
        # Several workers on one machine: each picks a free metrics port (advertised in
        # its record's tags).
        "MNEMOS_WORKER_METRICS_PORT": "0",
    }
    creds = worker_creds or nats.nats_creds
    if creds:
        env[CREDS_VARIABLE] = creds
    return env


@dataclass
class _PoolState:
    """What the acting autoscaler keeps for a pool (and writes as its status)."""

    spec: PoolSpec
    workers: dict[str, PoolWorker] = field(default_factory=dict)
    watching_since: datetime = field(default_factory=utcnow)
    history: list[DesiredPoint] = field(default_factory=list)
    decisions: list[ScalingDecision] = field(default_factory=list)
    at_max: bool = False
    removed: bool = False
    last_written: bytes = b""
    written_at: float = 0.0
    status: PoolStatus | None = None


class Autoscaler:
    """``async with Autoscaler(nc, nats_settings, settings):`` acts while it holds the lease."""

    def __init__(
        self,
        nc: NATS,
        nats_settings: NatsSettings,
        settings: AutoscalerSettings,
        *,
        provider_factory: Callable[[str], Provider] | None = None,
    ) -> None:
        self.nc = nc
        self.nats_settings = nats_settings
        self.settings = settings
        self.names = nats_settings.names
        self.js = nc.jetstream()
        self.instance_id = settings.instance_id or f"{socket.gethostname()[:40]}-{os.getpid()}"
        self.supervisor = Supervisor("autoscaler")
        self.metrics = AutoscalerMetrics()
        self.metrics_server: MetricsServer | None = None
        self.lease = Lease(self.js, self.names, self.instance_id, settings.lease_ttl_s)
        self._provider_factory = provider_factory or self._make_provider
        self.providers: dict[str, Provider] = {}
        self.specs: dict[str, PoolSpec] = {}
        self.records: dict[str, WorkerRecord] = {}
        #: Workers whose record expired (no heartbeat), and since when (monotonic).
        self.silent: dict[str, float] = {}
        self._loaded = (asyncio.Event(), asyncio.Event())
        self.pools: dict[str, _PoolState] = {}
        self.layout: Layout | None = None
        self._acting = False
        #: Rounds acted in (tests wait on it).
        self.ticks = 0

    # ------------------------------------------------------------------ lifecycle

    def _make_provider(self, name: str) -> Provider:
        if name == "local":
            return make_provider("local", namespace=self.names.prefix,
                                 state_dir=self.settings.state_dir / self.names.prefix,
                                 zygote=self.settings.local_zygote)
        return make_provider(name, namespace=self.names.prefix)

    async def provider(self, name: str) -> Provider:
        """The provider called ``name``, made and prepared (the local zygote started) the
        first time a pool names it."""
        found = self.providers.get(name)
        if found is None:
            found = self.providers[name] = self._provider_factory(name)
            try:
                await found.prepare()
            except Exception as e:  # noqa: BLE001 - it starts workers anyway, only slower
                log.warning("provider %s could not prepare (%r); its first start will be slower", name, e)
        return found

    async def __aenter__(self) -> Autoscaler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.layout = await ensure_layout(self.js, self.names)
        if self.settings.metrics_port != METRICS_DISABLED:
            self.metrics_server = await serve_metrics(
                self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port,
                hint="set MNEMOS_AUTOSCALER_METRICS_PORT to another port, 0 for any free one or -1 for none",
            )
        for (kv, what, kind, into, on_change), loaded in zip((
            (self.layout.pools, "pools", PoolSpec, self.specs, None),
            (self.layout.workers, "workers", WorkerRecord, self.records, self._on_record),
        ), self._loaded, strict=True):
            empty = not (await patiently(kv.status, f"read the {what} bucket")).stream_info.state.messages
            watcher = await patiently(kv.watchall, f"watch the {what} bucket")
            self.supervisor.spawn(what, mirror(watcher, kind, into, on_change=on_change, loaded=loaded,  # type: ignore[arg-type]
                                                empty=empty))
        self.supervisor.spawn("lease", self._lease_loop())
        self.supervisor.spawn("loop", self._loop())
        log.info("autoscaler %s started (namespace %s)", self.instance_id, self.names.prefix)

    async def stop(self) -> None:
        """Stop acting, give the lease up (a standby takes over at once), close providers.
        Workers keep running: they are the next leader's."""
        await self.supervisor.stop("loop")
        await self.supervisor.stop("lease")  # before the release: it must not take it again
        if self._acting and self.lease.held:
            await self._write_statuses(force=True)
        await self.lease.release()
        self.metrics.leader.set(0)
        await self.supervisor.stop()
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception as e:  # noqa: BLE001 - closing must not stop the rest
                log.warning("provider %s did not close cleanly: %r", provider.name, e)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self.supervisor.raise_if_failed()

    # ------------------------------------------------------------------ watches

    def _on_record(self, worker_id: str, record: WorkerRecord | None, operation: str | None) -> None:
        if record is not None or operation == "DEL":  # alive, or gone cleanly
            self.silent.pop(worker_id, None)
        else:  # expired (or purged): it stopped heartbeating; it may still run
            self.silent.setdefault(worker_id, time.monotonic())

    # ------------------------------------------------------------------ the loop

    async def _lease_loop(self) -> None:
        """Renew (or try to take) the lease on its own clock, whatever a round is doing."""
        while True:
            await self.lease.tick()
            await next_round(self.settings.lease_renew_s)

    def _guard(self) -> None:
        """Before anything that changes the world: still the leader?"""
        if not self.lease.held:
            raise _LeaseLost()

    def _step_down(self) -> None:
        log.warning("autoscaler %s stopped acting (lease lost)", self.instance_id)
        self._acting = False
        for name in self.pools:
            self.metrics.forget(name)
        self.pools.clear()

    async def _loop(self) -> None:
        for loaded in self._loaded:  # never act on a half-read bucket
            while not loaded.is_set():
                try:
                    await asyncio.wait_for(loaded.wait(), 10.0)
                except TimeoutError:
                    log.warning("still reading the pools and workers buckets before acting")
        while True:
            held = self.lease.held
            if held and not self._acting:
                await self._take_over()
            elif not held and self._acting:
                self._step_down()
            self.metrics.leader.set(1 if self._acting else 0)
            if not self._acting:
                # A hot standby: providers ready (the local zygote imported) before it may
                # have to take over, so a takeover acts at its first round.
                for name in sorted({spec.provider for spec in self.specs.values()}):
                    await self.provider(name)
            if self._acting and self.lease.held:
                started = time.perf_counter()
                try:
                    await self.round()
                except _LeaseLost:
                    self._step_down()
                except Exception as e:  # noqa: BLE001 - one bad round must not stop scaling
                    log.exception("autoscaler round failed: %r", e)
                self.metrics.tick_seconds.observe(time.perf_counter() - started)
                self.ticks += 1
            await next_round(self.settings.tick_s)

    async def _take_over(self) -> None:
        """Became the leader: read back every pool's status (its workers, its window)."""
        assert self.layout is not None
        self.pools.clear()
        keys: list[str] = []
        try:
            keys = await self.layout.autoscaler.keys()
        except Exception as e:  # noqa: BLE001 - nats-py raises NoKeysError on an empty bucket
            log.debug("no pool status to read back: %r", e)
        for key in keys:
            if not key.startswith("status."):
                continue
            try:
                entry = await self.layout.autoscaler.get(key)
                status = decode(entry.value or b"", PoolStatus)
            except Exception as e:  # noqa: BLE001 - gone meanwhile, or unreadable
                log.warning("pool status %s unreadable (%r); starting it afresh", key, e)
                continue
            spec = self.specs.get(status.pool)
            acted_on = spec or status.spec
            if acted_on is None:
                log.warning("pool %s: removed, and its status (by an older release) names no settings: its "
                            "workers are left as they are", status.pool)
                continue
            state = _PoolState(spec=acted_on if spec is not None else _removed(acted_on), removed=spec is None)
            state.workers = {w.worker_id: w for w in status.workers}
            # The window goes on where the last leader left it, unless that was long ago.
            if status.watching_since is not None and (utcnow() - status.updated_at).total_seconds() < 10:
                state.watching_since = status.watching_since
            state.history = list(status.need_history)
            state.decisions = list(status.decisions)
            state.at_max = status.at_max
            self.pools[status.pool] = state
        self._acting = True
        log.info("autoscaler %s acting; %d pool status(es) read back", self.instance_id, len(self.pools))

    async def round(self) -> None:
        """One look at every pool, and what it calls for."""
        for name, spec in self.specs.items():
            state = self.pools.get(name)
            if state is None:
                self.pools[name] = _PoolState(spec=spec)
            else:
                state.spec, state.removed = spec, False
        for name, state in self.pools.items():
            if name not in self.specs and not state.removed:
                state.removed = True
                state.spec = _removed(state.spec)
                self._decide(state, "remove", "the pool was removed: drain all its workers")
        demand = await self._messages()
        for name, state in list(self.pools.items()):
            try:
                await self._scale(state, demand.get(name, {}))
            except _LeaseLost:
                raise
            except ProviderError as e:
                self._decide(state, "error", f"provider {state.spec.provider}: {e}")
            except Exception as e:  # noqa: BLE001 - one pool's trouble must not stop the others
                log.exception("pool %s: round failed", name)
                self._decide(state, "error", f"{type(e).__name__}: {e}")
            if state.removed and not state.workers:
                await self._forget(name)
        await self._write_statuses()

    async def _messages(self) -> dict[str, dict[int, int]]:
        """Dispatch messages per pool and priority (one request for the whole stream)."""
        subjects = await dispatch_subject_counts(self.nc, self.names)
        pools = list(self.specs.values())
        out: dict[str, dict[int, int]] = {}
        for subject, count in subjects.items():
            try:
                runtime, priority, model = Names.parse_dispatch_model(subject)
            except (IndexError, ValueError):
                continue
            pool = pool_for(pools, runtime, model) if count else None
            if pool is not None:
                by_priority = out.setdefault(pool.name, {})
                by_priority[priority] = by_priority.get(priority, 0) + count
        return out

    # ------------------------------------------------------------------ one pool

    async def _scale(self, state: _PoolState, by_priority: dict[int, int]) -> None:
        pool = state.spec
        provider = await self.provider(pool.provider)
        view = await provider.list(pool)
        now = utcnow()
        await self._reconcile(state, provider, view, now)
        tracked = list(state.workers.values())
        ready = [w for w in tracked if w.state == "ready"]
        starting = [w for w in tracked if w.state == "starting"]
        records = [self.records[w.worker_id] for w in ready if w.worker_id in self.records]
        declared = max((r.max_concurrent_jobs for r in records), default=pool.worker_slots)
        per_worker = min(pool.target_concurrency or declared, declared)
        running = sum(len(r.current_jobs) for r in records)
        messages = sum(by_priority.values())
        demand = max(messages, running)
        current = len(ready) + len(starting) + view.pending
        p = plan(pool, demand=demand, per_worker=per_worker, current=current, now=now, history=state.history,
                 watching_since=state.watching_since)
        state.history = p.history
        if p.at_max and not state.at_max:
            self._decide(state, "at_max", f"{p.reason}; {demand} job(s) need more than max_workers "
                                          f"{pool.max_workers}: work waits")
        state.at_max = p.at_max
        # A silent worker serves nothing but may come back: it still counts against max_workers.
        silent = sum(1 for w in tracked if w.detail.startswith(_SILENT))
        grow = min(p.change, pool.max_workers - current - silent)
        if grow > 0:
            reason = p.reason if grow == p.change else f"{p.reason} ({silent} silent worker(s) count against the max)"
            await self._grow(state, provider, grow, reason)
        elif p.change < 0:
            await self._shrink(state, ready, -p.change, p.reason)
        busy = {w.worker_id for w in state.workers.values() if w.state == "ready" and w.busy}
        idle = {w.worker_id for w in state.workers.values() if w.state == "ready" and not w.busy}
        self._guard()
        await provider.protect(pool, busy, idle)
        counts = [w.state for w in state.workers.values()]
        state.status = PoolStatus(
            pool=pool.name, updated_at=now, autoscaler=self.instance_id, spec=pool, desired=p.desired,
            starting=counts.count("starting") + view.pending, ready=counts.count("ready"), busy=len(busy),
            draining=counts.count("draining"),
            messages_by_priority={str(k): v for k, v in sorted(by_priority.items(), reverse=True)},
            messages=messages, running=running, per_worker=per_worker, at_max=state.at_max,
            need=p.need, watching_since=state.watching_since, need_history=state.history,
            workers=sorted(state.workers.values(), key=lambda w: w.worker_id),
            decisions=state.decisions,
        )
        self.metrics.pool(pool.name, desired=p.desired, starting=state.status.starting, ready=state.status.ready,
                          busy=len(busy), draining=state.status.draining, messages=messages, at_max=state.at_max)

    async def _reconcile(self, state: _PoolState, provider: Provider, view: ProviderView, now: datetime) -> None:
        """Join what the provider runs with the worker records and what was asked."""
        pool = state.spec
        seen: set[str] = set()
        for pw in view.workers:
            seen.add(pw.worker_id)
            tracked = state.workers.get(pw.worker_id)
            record = self.records.get(pw.worker_id)
            if tracked is None:  # started by an earlier leader before it wrote it down, or by the cloud
                # Counted from now, not from the instance's launch (a warm pool's may be old).
                tracked = state.workers[pw.worker_id] = PoolWorker(
                    worker_id=pw.worker_id, state="starting", since=now, started_at=now)
            if pw.state == "terminating":
                await self._provider_takes(state, provider, tracked, record)
                continue
            silent_since = self.silent.get(pw.worker_id)
            if record is None and silent_since is not None and tracked.state in ("ready", "draining"):
                # No heartbeat: it may be cut off from NATS with a job running, and come back.
                # Its jobs are the control plane's to recover; it is stopped only after a grace.
                silent_for = time.monotonic() - silent_since
                if silent_for < self.settings.silent_grace_s:
                    if not tracked.detail.startswith(_SILENT):
                        state.workers[pw.worker_id] = _replace(tracked, state="draining", since=now,
                                                               detail=_SILENT)
                        self._decide(state, "silent", f"worker {pw.worker_id}: {_SILENT}",
                                     outcome=f"stopped in {self.settings.silent_grace_s:g}s unless it comes back")
                    continue
                self._guard()
                await provider.stop(pool, pw.worker_id)
                del state.workers[pw.worker_id]
                seen.discard(pw.worker_id)
                self.silent.pop(pw.worker_id, None)
                self._decide(state, "remove", f"worker {pw.worker_id}: no heartbeat for {silent_for:.0f}s",
                             asked=f"stop {pw.worker_id}", outcome="stopped")
                continue
            if record is None:
                if tracked.state in ("ready", "draining"):
                    # It registered before and has deregistered now: drained. Stop exactly it.
                    self._guard()
                    await provider.stop(pool, pw.worker_id)
                    del state.workers[pw.worker_id]
                    seen.discard(pw.worker_id)
                    self._decide(state, "remove", f"worker {pw.worker_id} drained and deregistered",
                                 asked=f"stop {pw.worker_id}", outcome="stopped")
                    continue
                age = (now - (tracked.started_at or tracked.since)).total_seconds()
                if age > pool.start_timeout_s:
                    self._guard()
                    await provider.stop(pool, pw.worker_id)
                    del state.workers[pw.worker_id]
                    seen.discard(pw.worker_id)
                    self._decide(state, "replace",
                                 f"worker {pw.worker_id} did not register within {pool.start_timeout_s:g}s",
                                 asked=f"stop {pw.worker_id}", outcome="stopped; a new one is started if needed")
                continue
            self._follow_record(state, tracked, record, now, pool)
        for worker_id in [w for w in state.workers if w not in seen]:
            gone = state.workers.pop(worker_id)
            if gone.state != "draining":
                self._decide(state, "remove", f"worker {worker_id} ({gone.state}) is no longer run by the provider",
                             outcome="forgotten (its jobs, if any, are recovered by the control plane)")

    def _follow_record(self, state: _PoolState, tracked: PoolWorker, record: WorkerRecord, now: datetime,
                       pool: PoolSpec) -> None:
        busy = bool(record.current_jobs) or record.status == "busy"
        if record.status in _STARTING:
            return
        if record.status in _READY and tracked.detail.startswith(_SILENT):  # it came back
            state.workers[tracked.worker_id] = _replace(tracked, state="ready", since=now, busy=busy, detail="")
            return
        if record.status in _READY:
            if tracked.state == "starting":
                started = tracked.started_at or tracked.since
                provisioning = max(0.0, (record.registered_at - started).total_seconds())
                self.metrics.provisioning.labels(pool.name, pool.provider).observe(provisioning)
                state.workers[tracked.worker_id] = _replace(
                    tracked, state="ready", since=now, provisioning_s=round(provisioning, 3), busy=busy)
            elif tracked.state == "ready" and tracked.busy != busy:
                state.workers[tracked.worker_id] = _replace(tracked, busy=busy)
            return
        if tracked.state != "draining":  # draining, stopped or error of its own accord
            state.workers[tracked.worker_id] = _replace(tracked, state="draining", since=now, busy=busy,
                                                        detail=f"worker status {record.status}")

    async def _provider_takes(self, state: _PoolState, provider: Provider, tracked: PoolWorker,
                              record: WorkerRecord | None) -> None:
        """The provider (the cloud) is taking this worker away: drain it, then let it go."""
        pool = state.spec
        if record is not None and record.status not in ("stopped",):
            if tracked.state != "draining":
                self._guard()
                reply = await self._command(tracked.worker_id, "drain")
                state.workers[tracked.worker_id] = _replace(tracked, state="draining", since=utcnow(),
                                                            detail="taken away by the provider")
                self._decide(state, "drain", f"the provider is terminating {tracked.worker_id}",
                             asked=f"drain {tracked.worker_id}",
                             outcome="draining" if reply is not None else "no answer: it drains on SIGTERM anyway")
            return
        self._guard()
        await provider.release(pool, tracked.worker_id)
        state.workers.pop(tracked.worker_id, None)
        self._decide(state, "release", f"worker {tracked.worker_id} drained for the provider's termination",
                     asked=f"release {tracked.worker_id}", outcome="released")

    async def _grow(self, state: _PoolState, provider: Provider, count: int, reason: str) -> None:
        pool = state.spec
        asked = f"start {count} worker(s) ({pool.provider})"
        asked_at, began = utcnow(), time.perf_counter()
        self._guard()
        try:
            ids = await provider.start(WorkerLaunch(
                pool=pool, env=worker_launch_env(pool, self.nats_settings, self.settings.worker_nats_creds)), count)
        except ProviderError as e:
            self._decide(state, "scale_up", reason, asked=asked, outcome=f"failed: {e}")
            return
        took = round(time.perf_counter() - began, 4)
        for worker_id in ids:
            state.workers[worker_id] = PoolWorker(worker_id=worker_id, state="starting", since=utcnow(),
                                                  started_at=asked_at, provider_start_s=took)
        self._decide(state, "scale_up", reason, asked=asked,
                     outcome=f"started {', '.join(ids)}" if ids else "asked; instances appear as they launch")
        # Written at once: a leader that dies now leaves its successor the workers it asked for.
        await self._write_statuses(force=True, only=state)

    async def _shrink(self, state: _PoolState, ready: list[PoolWorker], count: int, reason: str) -> int:
        """Drain up to ``count`` idle workers; how many agreed."""
        candidates = [w for w in ready if not w.busy]
        idle_records = [
            (self.records[w.worker_id], w) for w in candidates
            if w.worker_id in self.records and not self.records[w.worker_id].current_jobs
        ]
        # Newest first: the longest-lived keep their warm caches.
        idle_records.sort(key=lambda rw: rw[0].registered_at, reverse=True)
        agreed: list[str] = []
        refused: list[str] = []
        for _record, tracked in idle_records:
            if len(agreed) >= count:
                break
            self._guard()
            reply = await self._command(tracked.worker_id, "drain_if_idle")
            if reply is not None and reply.status == "draining":
                agreed.append(tracked.worker_id)
                state.workers[tracked.worker_id] = _replace(tracked, state="draining", since=utcnow(),
                                                            detail="scale-down")
            else:
                refused.append(tracked.worker_id)
        busy = len(ready) - len(idle_records)
        outcome = f"draining {', '.join(agreed) or 'none'}"
        if refused:
            outcome += f"; busy when asked, kept: {', '.join(refused)}"
        if busy:
            outcome += f"; {busy} busy worker(s) not considered"
        if agreed or refused:
            self._decide(state, "scale_down", reason, asked=f"drain_if_idle {count} idle worker(s)", outcome=outcome)
        return len(agreed)

    async def _command(self, worker_id: str, command: str) -> WorkerRecord | None:
        try:
            msg = await self.nc.request(self.names.worker_control_subject(worker_id),
                                        encode(WorkerCommand(command=command)),  # type: ignore[arg-type]
                                        timeout=self.settings.command_timeout_s)
            return decode(msg.data, WorkerRecord)
        except Exception as e:  # noqa: BLE001 - no answer: treated as a refusal, asked again later
            log.info("worker %s did not answer %s: %r", worker_id, command, e)
            return None

    # ------------------------------------------------------------------ status

    def _decide(self, state: _PoolState, action: str, reason: str, *, asked: str = "", outcome: str = "") -> None:
        decision = ScalingDecision(at=utcnow(), action=action, reason=reason, asked=asked, outcome=outcome)
        last = state.decisions[-1] if state.decisions else None
        same = (action, reason, asked, outcome)
        if last is not None and (last.action, last.reason, last.asked, last.outcome) == same:
            # The same again (a provider error each round): one entry, counted.
            state.decisions = [*state.decisions[:-1], _replace(decision, repeated=last.repeated + 1)]
            self.metrics.decisions.labels(state.spec.name, action).inc()
            return
        state.decisions = [*state.decisions, decision][-self.settings.decisions_kept:]
        self.metrics.decisions.labels(state.spec.name, action).inc()
        log.info("pool %s: %s: %s%s%s", state.spec.name, action, reason, f"; asked: {asked}" if asked else "",
                 f"; {outcome}" if outcome else "")

    async def _write_statuses(self, *, force: bool = False, only: _PoolState | None = None) -> None:
        assert self.layout is not None
        now = time.monotonic()
        for state in [only] if only is not None else list(self.pools.values()):
            status = state.status
            if status is None or state.removed and not state.workers:
                continue
            if only is not None:  # a scale-up: what was asked must be on record now
                status = state.status = msgspec.structs.replace(
                    status, workers=sorted(state.workers.values(), key=lambda w: w.worker_id),
                    decisions=state.decisions, updated_at=utcnow())
            body = encode(msgspec.structs.replace(status, updated_at=_EPOCH))
            if not force and body == state.last_written and now - state.written_at < self.settings.status_every_s:
                continue
            try:
                await self.layout.autoscaler.put(Names.pool_status_key(status.pool), encode(status))
                state.last_written, state.written_at = body, now
            except Exception as e:  # noqa: BLE001 - written again next round
                log.warning("pool %s status not written: %r", status.pool, e)

    async def _forget(self, name: str) -> None:
        assert self.layout is not None
        self.pools.pop(name, None)
        self.metrics.forget(name)
        try:
            await self.layout.autoscaler.delete(Names.pool_status_key(name))
        except Exception as e:  # noqa: BLE001
            log.warning("pool %s status not deleted: %r", name, e)


def _removed(spec: PoolSpec) -> PoolSpec:
    """A removed pool's settings: no worker wanted, no window to wait."""
    return msgspec.structs.replace(spec, min_workers=0, max_workers=0, buffer_workers=0, scaledown_window_s=0.0)


S = TypeVar("S", PoolWorker, ScalingDecision)


def _replace(struct: S, **changes: Any) -> S:
    return msgspec.structs.replace(struct, **changes)
