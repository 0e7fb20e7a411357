"""The worker (NEURON): register -> heartbeat -> pull by priority -> run -> drain.

Its status, written to its record in ``mnemos_workers`` once at each change:
``initializing`` (built) -> ``connecting`` (to NATS) -> ``registering`` (layout, first
record, model catalog) -> ``starting`` (model pool, executor, puller) -> ``idle``/``busy``
(``paused`` while paused) -> ``draining`` -> ``stopped`` (the last record, then it
deregisters). ``error``: something fatal happened (a supervised background task died, or
the start failed); the record says why (``error``) and is left to expire, and the process
exits non-zero. The first two states are only logged: NATS is not there yet. Idle/busy
flips are not written on their own (that would cost a write per job): heartbeats carry them.

Shutdown order (``drain``): stop pulling -> wait up to ``drain_timeout_s`` for in-flight
jobs -> hand the rest back to the queue (nak: another worker takes them at once, and it is
not counted as a failed attempt) -> last record, deregister -> unload models -> stop the
background tasks -> stop serving metrics -> re-raise the first fatal background error.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from mnemos.catalog import ModelCatalog
from mnemos.config import NatsSettings
from mnemos.errors import MnemosError, NotConnected, ValidationFailed
from mnemos.jetstream import Publisher
from mnemos.jobstore import JobStore
from mnemos.kvscan import kv_values
from mnemos.layout import Layout, LayoutOptions, ensure_layout
from mnemos.messages import (
    JobRecord,
    ModelRecord,
    WorkerCommand,
    WorkerRecord,
    WorkerStatus,
    decode,
    encode,
    error_envelope,
    utcnow,
)
from mnemos.metrics import METRICS_DISABLED, MetricsServer, serve_metrics
from mnemos.tasks import Supervisor, next_round
from neuron_runtime.actors import ActorPlacement
from neuron_runtime.affinity import Affinity
from neuron_runtime.cache import DiskCache
from neuron_runtime.config import WorkerSettings
from neuron_runtime.executor import Executor
from neuron_runtime.metrics import WorkerMetrics, WorkerState
from neuron_runtime.pool import ModelPool
from neuron_runtime.puller import PriorityPuller
from neuron_runtime.resources import ResourceMonitor
from neuron_runtime.runtimes import RUNTIME_CLASSES
from neuron_runtime.runtimes.base import Runtime
from neuron_runtime.runtimes.python import PythonRuntime
from registry.config import RegistrySettings
from registry.store import open_store

__all__ = ["Worker"]

log = logging.getLogger("mnemos.worker")

#: How long a doorbell-woken idle worker keeps its pull open for more jobs of that level.
#: It also bounds how long a higher-priority job can wait behind it while slots are free.
_IDLE_LONG_POLL_S = 0.1


def _configure_torch(threads: int) -> None:
    """Import torch and set its CPU thread count (in a thread, off the event loop). Only
    when it differs: ``set_num_threads`` holds the GIL, and waits for torch's thread pool
    if another thread is computing, which would stall the event loop meanwhile."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class _Services:
    """The disk cache and catalog, as an app process's host asks for them."""

    def __init__(self, disk: DiskCache, catalog: ModelCatalog, nats: NatsSettings) -> None:
        self.disk = disk
        self.catalog = catalog
        self.nats = nats

    @property
    def nats_env(self) -> dict[str, str]:
        env = {"MNEMOS_NATS_URL": self.nats.nats_url, "MNEMOS_NAMESPACE": self.nats.namespace}
        if self.nats.nats_creds:
            env["MNEMOS_NATS_CREDS"] = self.nats.nats_creds
        return env

    @property
    def root(self) -> Path:
        return self.disk.root

    def checkout(self, record: ModelRecord) -> AbstractAsyncContextManager[Any]:
        return self.disk.checkout(record)

    async def resolve(self, name: str) -> ModelRecord:
        return await self.catalog.resolve(name)


class Worker:
    """One worker process's job machinery. ``async with Worker(...)`` then ``await drain()``.

    ``nc``: a connected client, or None to connect later with :meth:`connect` (``mnemos
    worker`` does, so that the worker is ``connecting`` meanwhile).
    """

    def __init__(
        self,
        nc: NATS | None,
        nats_settings: NatsSettings,
        settings: WorkerSettings,
        registry_settings: RegistrySettings | None = None,
        runtimes: dict[str, Runtime] | None = None,
    ) -> None:
        self._nc = nc
        self._js: JetStreamContext | None = None
        self.names = nats_settings.names
        self.nats_settings = nats_settings
        self.settings = settings
        self.registry_settings = registry_settings or RegistrySettings()
        self.worker_id = settings.worker_id
        self.runtimes = runtimes if runtimes is not None else self._default_runtimes(settings)
        if not self.runtimes:
            raise ValidationFailed("this worker has no runtime that can run here")
        self.monitor = ResourceMonitor(settings.cache_dir)
        self.layout: Layout | None = None
        self.catalog: ModelCatalog | None = None
        self.pool: ModelPool | None = None
        self.executor: Executor | None = None
        self.puller: PriorityPuller | None = None
        self.affinity: Affinity | None = None
        self.publisher: Publisher | None = None
        self.metrics = WorkerMetrics(self._metrics_state)
        self.metrics_server: MetricsServer | None = None
        #: Every background task of this worker; the first that dies puts it in ``error``.
        self.supervisor = Supervisor(f"worker-{self.worker_id}", on_failure=self._on_task_died)
        self.registered_at = utcnow()
        self.started_monotonic = time.monotonic()
        #: Set when the worker wants its process to exit (recycling, a drain command, an error).
        self.exit_requested = asyncio.Event()
        self.exit_reason = ""
        #: Why the worker is in ``error`` (also in its record).
        self.error: str | None = None
        self._status: WorkerStatus = "initializing"
        self._paused = False
        self._draining = False
        self._active = 0
        self._slot_freed = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._record_lock = asyncio.Lock()
        self._heartbeat_now: asyncio.Task[Any] | None = None
        self._subs: list[Subscription] = []
        self.actor_placement: ActorPlacement | None = None
        self._activations: list[Subscription] = []
        self._fatal: BaseException | None = None
        self._registered = False  # its first record is written: it leaves a last one
        self._started = False
        self._stopped = False
        log.info("worker %s initializing", self.worker_id)

    @staticmethod
    def _default_runtimes(settings: WorkerSettings) -> dict[str, Runtime]:
        names = settings.runtimes or [n for n, cls in RUNTIME_CLASSES.items() if cls.available()]
        out: dict[str, Runtime] = {}
        for name in names:
            cls = RUNTIME_CLASSES[name]
            if not cls.available():
                raise ValidationFailed(f"runtime {name!r} cannot run on this machine")
            out[name] = cls()
        return out

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise NotConnected(f"worker {self.worker_id} is not connected to NATS")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    @property
    def status(self) -> WorkerStatus:
        """What its record says: ``paused`` stands in for idle/busy while paused."""
        return "paused" if self._paused and self._status in ("idle", "busy") else self._status

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.max_concurrent_jobs - self._active)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, open_connection: Callable[[], Awaitable[NATS]]) -> NATS:
        """Open the NATS connection with ``open_connection`` (``connecting``); a failure is
        the ``error`` state, then raised. The caller closes the connection after ``drain``."""
        if self._nc is not None:
            return self._nc
        self._enter("connecting")
        try:
            self._nc = await open_connection()
        except Exception as e:
            self._enter("error", error=f"cannot connect to NATS: {e}")
            raise
        return self._nc

    async def start(self) -> None:
        """Register and start taking jobs. A failure puts the worker in ``error`` (its record
        says why, if it was registered), releases what was started, and is raised."""
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except Exception as e:
            self._enter("error", error=f"start failed while {self._status}: {type(e).__name__}: {e}", publish=False)
            self._stopped = True
            await self._close()
            raise

    async def _start(self) -> None:
        s = self.settings
        if s.metrics_port != METRICS_DISABLED:
            # First: a taken port fails the start before anything else is started (and
            # before the worker is visible anywhere).
            self.metrics_server = await serve_metrics(
                self.metrics.registry, s.metrics_host, s.metrics_port,
                hint="set MNEMOS_WORKER_METRICS_PORT to a free port, 0 for any, -1 for none",
            )
        self._enter("registering")
        self.layout = await ensure_layout(self.js, self.names, LayoutOptions(replicas=self.nats_settings.replicas))
        self._registered = True
        await self._write_record()
        # From the first record on, heartbeats keep it alive (starting can take a while:
        # importing torch, a large catalog).
        self.supervisor.spawn("heartbeat", self._every(s.heartbeat_interval_s, self._beat))
        self.catalog = ModelCatalog(self.layout.models)
        await self.catalog.start(self.supervisor)
        self._enter("starting", publish=False)
        await self._write_record()
        disk = DiskCache(
            s.cache_dir,
            int(s.cache_budget_gb * 2**30),
            open_store=lambda location: open_store(location, self.js, self.registry_settings),
        )
        for runtime in self.runtimes.values():
            runtime.attach(_Services(disk, self.catalog, self.nats_settings))
        self.pool = ModelPool(
            self.runtimes,
            disk,
            self.catalog,
            max_models=s.max_loaded_models,
            memory_budget_bytes=int(s.model_memory_budget_mb * 2**20) if s.model_memory_budget_mb else None,
            load_timeout_s=s.model_load_timeout_s,
            on_change=self._heartbeat_soon,
        )
        self.publisher = Publisher(self.nc)
        await self.publisher.start()
        self.executor = Executor(
            self.nc, self.names, JobStore(self.publisher, self.layout.jobs, self.names.jobs_bucket), self.pool,
            self.worker_id,
            on_finished=self._on_finished,
            stream_interval_s=s.stream_interval_ms / 1000.0,
            claim_delay_s=s.claim_delay_ms / 1000.0,
            metrics=self.metrics,
            supervisor=self.supervisor,
        )
        pool = self.pool
        self.affinity = Affinity(self.worker_id, lambda: (set(pool.loaded_names()), s.max_loaded_models),
                                 spill_delay_s=s.spill_delay_ms / 1000.0)
        self._subs.append(await self.nc.subscribe(self.names.heartbeat_all, cb=self._on_peer_record))
        # Peers that started before this worker speak again only at their next heartbeat:
        # read their records now (in the background; the subscription above misses nothing).
        self.supervisor.spawn_oneshot("read-peers", self._read_peers())
        self.puller = PriorityPuller(
            self.nc, self.names, list(self.runtimes), self._on_message, ack_wait_s=s.ack_wait_s,
            affinity=self.affinity if s.spill_delay_ms > 0 else None,
        )
        self._subs.append(await self.nc.subscribe(self.names.cancel_all, cb=self._on_cancel))
        self._subs.append(
            await self.nc.subscribe(self.names.worker_control_subject(self.worker_id), cb=self._on_control)
        )
        python = self.runtimes.get("python")
        if isinstance(python, PythonRuntime):
            self.actor_placement = ActorPlacement(self.nc, self.names, self.layout, python, self.catalog,
                                                  self.worker_id)
            self._activations = await self.actor_placement.start()
        await self.puller.start()
        self._enter("busy" if self._active else "idle", publish=False)  # a job may be in already
        await self._write_record()
        if {"transformers", "pytorch"} & set(self.runtimes):
            # After the worker is ready, not before: importing torch takes about a second
            # in a fresh process (none in one forked from the zygote). A model load that
            # comes first waits for the same import (Python's import lock).
            self.supervisor.spawn_oneshot("import-torch", asyncio.to_thread(_configure_torch, s.torch_threads))
        self.supervisor.spawn("in-progress", self._every(s.ack_wait_s / 3, self.executor.touch_all))
        self.supervisor.spawn("pull", self._pull_loop())
        log.info(
            "worker %s up: runtimes=%s slots=%d namespace=%s",
            self.worker_id, ",".join(self.runtimes), s.max_concurrent_jobs, self.names.prefix,
        )

    async def drain(self) -> None:
        """Stop pulling, finish or hand back in-flight jobs, deregister; re-raise a fatal
        background error. Safe to call twice."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._draining = True
        if self._status not in ("draining", "error"):
            self._enter("draining", publish=False)
            await self._write_record()
        await self.supervisor.stop("pull")
        if self.puller is not None:
            await self.puller.stop()
        for sub in self._activations[:1]:  # no new actors here; those here move when it stops
            await sub.unsubscribe()
        if self.actor_placement is not None:
            await self.actor_placement.close()
        if self._jobs:
            log.info("draining: waiting up to %.0fs for %d job(s)", self.settings.drain_timeout_s, len(self._jobs))
            await asyncio.wait(set(self._jobs), timeout=self.settings.drain_timeout_s)
        if self._jobs and self.executor is not None:
            log.warning("drain timeout: handing %d job(s) back to the queue", len(self._jobs))
            unfinished = list(self.executor.running.values())
            for ex in unfinished:
                if ex.ctx is not None:
                    ex.ctx.cancel()
            for task in list(self._jobs):
                task.cancel()
            await asyncio.gather(*self._jobs, return_exceptions=True)
            for ex in unfinished:
                await self.executor.hand_back(ex)
        await self._close()
        if self._fatal is not None:
            raise self._fatal

    async def _close(self) -> None:
        """Release what :meth:`_start` set up, in reverse; a partial start included."""
        await self.supervisor.stop("heartbeat")
        await self.supervisor.stop("in-progress")
        for sub in [*self._subs, *self._activations[1:]]:
            try:
                await sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - the connection may be gone (an error exit)
                log.debug("unsubscribe %s: %r", sub.subject, e)
        self._subs.clear()
        await self._last_record()
        if self.pool is not None:
            await self.pool.close()
        for name, runtime in self.runtimes.items():
            try:
                await runtime.close()
            except Exception:
                log.exception("closing the %s runtime failed", name)
        if self.catalog is not None:
            await self.catalog.stop()
        await self.supervisor.stop()  # what is left: record writes, engine stops, doorbells
        if self.publisher is not None:
            await self.publisher.close()
        metrics_server, self.metrics_server = self.metrics_server, None
        if metrics_server is not None:
            await metrics_server.close()
        log.info("worker %s %s", self.worker_id, "stopped" if self._status == "stopped" else "ended in error")

    async def _last_record(self) -> None:
        """``stopped``, then deregister; or, after an error, the ``error`` record, left to
        expire (three heartbeat intervals) so that operators see why it went away."""
        if not self._registered:
            return  # never visible: nothing to leave behind
        if self._status != "error":
            self._enter("stopped", publish=False)
        await self._write_record()
        if self._status == "error":
            return
        assert self.layout is not None
        try:
            await self.layout.workers.delete(self.worker_id)
        except Exception as e:
            log.warning("could not deregister %s: %r", self.worker_id, e)

    async def __aenter__(self) -> "Worker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    # ------------------------------------------------------------------ states

    def _enter(self, status: WorkerStatus, *, error: str | None = None, publish: bool = True) -> None:
        """Enter a lifecycle state: one log line, and (``publish``, once registered) the
        record as of now, written once. ``error`` is final, and ``draining`` leads only to
        ``stopped`` or ``error`` (a drain asked for while starting is not undone)."""
        if status == self._status or self._status == "error":
            return
        if self._status == "draining" and status not in ("stopped", "error"):
            return
        old, self._status = self._status, status
        if status == "error":
            self.error = error
            log.error("worker %s: %s -> error: %s", self.worker_id, old, error)
        else:
            log.info("worker %s: %s -> %s", self.worker_id, old, status)
        if publish:
            self._publish_now()

    def _publish_now(self) -> None:
        """Write the record as it is now (a state change), behind writes under way."""
        if self._registered and self._nc is not None:
            self.supervisor.spawn_oneshot("record", self._write_record(encode(self.record())))

    def _request_exit(self, reason: str) -> None:
        """Take no more jobs and ask ``main`` to drain and exit (recycling, a drain command)."""
        if self.exit_requested.is_set():
            return
        self.exit_reason = reason
        self._draining = True
        self._enter("draining")
        self.exit_requested.set()

    def _on_task_died(self, task: str, exc: BaseException) -> None:
        """A supervised task died: ``error`` (written now), then drain and exit non-zero."""
        self._fatal = exc
        self._enter("error", error=f"background task {task} died: {exc!r}")
        self.exit_reason = f"error: background task {task} died"
        self._draining = True
        self.exit_requested.set()

    # ------------------------------------------------------------------ background tasks

    async def _cancel_background(self, name: str) -> None:
        """Stop one background loop (``heartbeat``, ``in-progress``, ``pull``)."""
        await self.supervisor.stop(name)

    @staticmethod
    async def _every(interval: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await next_round(interval)
            await fn()

    # ------------------------------------------------------------------ pulling

    async def _pull_loop(self) -> None:
        assert self.puller is not None
        puller = self.puller
        woken = False  # the doorbell (not a freed slot) woke an idle worker
        while True:
            if self.free_slots <= 0 or self._paused:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                woken = False
                continue
            rung = puller.doorbell.take()
            try:
                if woken and rung:
                    taken = await puller.pull_rung(rung, self.free_slots, _IDLE_LONG_POLL_S)
                else:
                    taken = await puller.sweep(self.free_slots, rung)
                woken = False
                if taken:
                    continue
            except (MnemosError, OSError, TimeoutError) as e:
                log.warning("pull failed (%r); retrying after the doorbell or %ss", e,
                            self.settings.idle_recheck_s)
            except Exception as e:  # nats-py raises its own error types when disconnected
                log.warning("pull failed (%r)", e)
            woken = False
            try:
                await asyncio.wait_for(puller.doorbell.event.wait(), timeout=self.settings.idle_recheck_s)
                woken = True
            except TimeoutError:
                puller.resync()

    def _on_message(self, msg: Msg) -> None:
        if self._draining or self._paused or self.executor is None:
            # Not ours to take: a paused worker takes no job once it has answered ``pause``,
            # even one its last pull request brings in afterwards. The job goes back at once,
            # and idle workers are rung for it (a nak'ed message comes back without a publish).
            self._spawn_job(msg.nak())
            if self.executor is not None:
                self.executor.ring_when_ready(msg.subject, 0.01)
            return
        self._active += 1
        if self._status == "idle":
            self._status = "busy"
        self._spawn_job(self.executor.handle(msg), counted=True)

    def _spawn_job(self, coro: Coroutine[Any, Any, None], counted: bool = False) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._jobs.discard(t)
            if counted:
                self._active -= 1
                if self._active == 0 and self._status == "busy":
                    self._status = "idle"
                self._slot_freed.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("job task failed: %r", t.exception(), exc_info=t.exception())

        task.add_done_callback(done)

    def _on_finished(self, record: JobRecord) -> None:
        """After each job: recycle (Neutrino's rule) when a limit is reached."""
        self._recycle_if_due()

    def _recycle_if_due(self) -> None:
        """Drain and exit once a recycling limit is reached: after a job, and at each
        heartbeat while idle (so an idle worker reaches its max lifetime too)."""
        s = self.settings
        ex = self.executor
        reason = ""
        if s.max_jobs is not None and ex is not None and ex.completed + ex.failed >= s.max_jobs:
            reason = f"ran {s.max_jobs} jobs"
        elif s.max_rss_mb is not None and self.monitor.rss_mb() > s.max_rss_mb:
            reason = f"RSS above {s.max_rss_mb:.0f} MB"
        elif s.max_lifetime_s is not None and time.monotonic() - self.started_monotonic > s.max_lifetime_s:
            reason = f"older than {s.max_lifetime_s:g}s"
        if reason and not self.exit_requested.is_set():
            log.info("worker %s recycling: %s", self.worker_id, reason)
            self._request_exit(f"recycle: {reason}")

    # ------------------------------------------------------------------ signals

    async def _read_peers(self) -> None:
        assert self.layout is not None and self.affinity is not None
        async for _key, value, _rev in kv_values(self.layout.workers):
            try:
                record = decode(value, WorkerRecord)
                self.affinity.heard(record, age_s=(utcnow() - record.last_heartbeat).total_seconds())
            except MnemosError as e:
                log.debug("ignoring an unreadable worker record: %s", e)

    async def _on_peer_record(self, msg: Msg) -> None:
        """Another worker's record (its heartbeat): who holds which model, for routing."""
        if self.affinity is None:
            return
        try:
            self.affinity.heard(decode(msg.data, WorkerRecord))
        except MnemosError as e:
            log.debug("ignoring an unreadable worker record on %s: %s", msg.subject, e)

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rpartition(".")[2]
        if self.executor is not None and self.executor.cancel(job_id):
            log.info("job %s: cancel signal received; stopping its execution", job_id)

    async def _on_control(self, msg: Msg) -> None:
        try:
            cmd = decode(msg.data, WorkerCommand)
        except MnemosError as e:
            if msg.reply:  # the one error envelope, as the control plane's micro errors
                body, headers = error_envelope(e)
                await self.nc.publish(msg.reply, body, headers=headers)
            return
        if cmd.command in ("pause", "resume"):
            self._set_paused(cmd.command == "pause")
        elif cmd.command == "drain":
            self._request_exit("drain requested")
        elif cmd.command == "drain_if_idle" and self._active == 0 and self._status in ("idle", "paused"):
            # Decided and done in one step of the loop: no job can start in between, and a
            # message a pull brings in afterwards goes back to the queue untouched.
            self._request_exit("drain requested (idle: scale-down)")
        if msg.reply:
            await msg.respond(encode(self.record()))

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        before = self.status
        self._paused = paused
        if not paused:
            self._slot_freed.set()
        if self.status != before:  # idle/busy <-> paused: a state change, written once
            log.info("worker %s: %s -> %s", self.worker_id, before, self.status)
            self._publish_now()

    # ------------------------------------------------------------------ heartbeat

    def _metrics_state(self) -> WorkerState | None:
        if self.executor is None or self.pool is None:
            return None
        return WorkerState(
            slots=self.settings.max_concurrent_jobs,
            busy_slots=self._active,
            jobs_in_progress=len(self.executor.running),
            memory_hits=self.pool.hits,
            memory_misses=self.pool.misses,
            disk_hits=self.pool.disk.hits,
            disk_misses=self.pool.disk.misses,
        )

    def record(self) -> WorkerRecord:
        ex = self.executor
        tags = dict(self.settings.tags)
        if self.metrics_server is not None:
            tags["metrics"] = self.metrics_server.url
        return WorkerRecord(
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            version=self.settings.version,
            status=self.status,
            runtimes=list(self.runtimes),  # type: ignore[arg-type]
            max_concurrent_jobs=self.settings.max_concurrent_jobs,
            free_slots=self.free_slots,
            registered_at=self.registered_at,
            last_heartbeat=utcnow(),
            current_jobs=sorted(ex.running) if ex else [],
            loaded_models=self.pool.loaded_names() if self.pool else [],
            resources=self.monitor.snapshot(),
            tags=tags,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            jobs_completed=ex.completed if ex else 0,
            jobs_failed=ex.failed if ex else 0,
            error=self.error,
            max_loaded_models=self.settings.max_loaded_models,
        )

    def _heartbeat_soon(self) -> None:
        """Advertise a change (a model loaded or evicted) now rather than at the next beat."""
        task = self._heartbeat_now
        if self._registered and not self._stopped and (task is None or task.done()):
            self._heartbeat_now = self.supervisor.spawn_oneshot("record", self._write_record())

    async def _beat(self) -> None:
        """One heartbeat: an idle worker past a recycling limit starts draining; then the
        record is written (it keeps the KV entry from expiring)."""
        if self._active == 0 and self._status == "idle":
            self._recycle_if_due()
        await self._write_record()

    async def _write_record(self, data: bytes | None = None) -> None:
        """Publish the record (``data``: as it was at a state change; else as it is now) on
        the heartbeat subject and refresh its expiring KV entry. Writes go one at a time,
        in order, so the bucket always ends with the latest. Never raises: a failure is
        logged (the next heartbeat tries again)."""
        async with self._record_lock:
            if data is None:
                data = encode(self.record())
            try:
                await self.nc.publish(self.names.heartbeat_subject(self.worker_id), data)
                await self.js.publish(
                    self.names.kv_key_subject(self.names.workers_bucket, self.worker_id),
                    data,
                    msg_ttl=self.settings.heartbeat_ttl_s,
                )
            except Exception as e:  # noqa: BLE001 - NATS may be away; the record is retried
                log.warning("worker record not written (%s): %r", self.status, e)
