"""The control plane: the ``mnemos-control-plane`` NATS micro service on ``mnemos.api.*``.

Stateless apart from JetStream: any number of processes may run; the endpoints share a
queue group, and every job-state change is a compare-and-set on the KV revision.

Submitting a job is two JetStream writes: the record (``queued``) into ``mnemos_jobs``
and a :class:`~mnemos.messages.Dispatch` (record + revision) onto
``mnemos.dispatch.<runtime>.<priority>.<model>``. ``jobs.run`` puts the requester's reply
subject into the record; the worker that finishes the job answers it directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from control_plane.actors import list_actors
from control_plane.admission import Admission
from control_plane.apps import AppDirectory
from control_plane.backpressure import QueueDepth
from control_plane.config import ControlPlaneSettings
from control_plane.deferred import DeferredRecords
from control_plane.index import JobIndex
from control_plane.metrics import OK, ControlPlaneMetrics
from control_plane.pools import PoolDirectory
from control_plane.quotas import TenantQuotas
from control_plane.reaper import JobActions, Reaper, ReaperTimings
from mnemos.catalog import ModelCatalog
from mnemos.config import NatsSettings
from mnemos.connection import barrier, patiently, unavailable_from
from mnemos.endpoints import (
    JOBS_CANCEL,
    JOBS_GET,
    JOBS_LIST,
    JOBS_RETRY,
    JOBS_RUN,
    JOBS_START,
    JOBS_SUBMIT,
    MODELS_GET,
    MODELS_LIST,
    POOLS_DELETE,
    POOLS_GET,
    POOLS_LIST,
    POOLS_SET,
    TENANTS_DELETE,
    TENANTS_GET,
    TENANTS_LIST,
    TENANTS_SET,
    APPS_DEPLOY,
    ACTORS_LIST,
    APPS_GET,
    APPS_LIST,
    WORKERS_LIST,
    bind,
)
from mnemos.errors import (
    Conflict,
    Forbidden,
    Internal,
    InvalidRequest,
    JobNotFound,
    JobTimeout,
    MnemosError,
    ModelNotFound,
    PayloadTooLarge,
    TenantNotFound,
    Unavailable,
    UnknownModel,
    UnknownRuntime,
    ValidationFailed,
)
from mnemos import lifecycle
from mnemos.bounds import check_job
from mnemos.jetstream import Publisher
from mnemos.jobstore import JobStore
from mnemos.layout import Layout, LayoutOptions, ensure_layout
from mnemos.metrics import METRICS_DISABLED, MetricsServer, serve_metrics
from mnemos.messages import (
    CancelJob,
    ListActors,
    DeployApp,
    GetApp,
    ListApps,
    ErrorReply,
    GetJob,
    GetModel,
    GetPool,
    JobList,
    JobRecord,
    JobSpec,
    ListJobs,
    ListModels,
    ListPools,
    ListWorkers,
    Dispatch,
    ModelList,
    ModelRecord,
    TERMINAL_STATUSES,
    ResultFinal,
    decode_result,
    RemovePool,
    RetryJob,
    SetPool,
    GetTenant,
    ListTenants,
    RemoveTenant,
    SetTenant,
    TenantList,
    Waiting,
    WaitReason,
    WorkerList,
    decode,
    encode,
    encode_dispatch,
    utcnow,
)
from mnemos.names import (
    Names,
    validate_tenant,
    HDR_MSG_ID,
    HDR_RECORD_FOLLOWS,
    HDR_TENANT,
    RUNTIMES,
    SERVICE_NAME,
    SERVICE_VERSION,
    TEXT_RUNTIMES,
    model_token,
)
from mnemos.runtime_config import job_runtime_config
from mnemos.tasks import Supervisor

__all__ = ["ControlPlane"]

log = logging.getLogger("mnemos.control_plane")


class ControlPlane:
    """One control-plane process. ``async with ControlPlane(nc, ...)`` serves until exit."""

    def __init__(self, nc: NATS, nats_settings: NatsSettings, settings: ControlPlaneSettings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.names = nats_settings.names
        self.settings = settings
        self._layout_options = LayoutOptions(
            replicas=nats_settings.replicas,
            job_retention_s=settings.job_retention_s,
            results_retention_s=settings.results_retention_s,
            idempotency_window_s=settings.idempotency_window_s,
        )
        self.layout: Layout | None = None
        self.jobs: JobStore | None = None
        self.catalog: ModelCatalog | None = None
        self.service: Service | None = None
        self.publisher: Publisher | None = None
        self.deferred: DeferredRecords | None = None
        self.reaper: Reaper | None = None
        self.index: JobIndex | None = None
        self.depth: QueueDepth | None = None
        self.pools: PoolDirectory | None = None
        self.quotas: TenantQuotas | None = None
        self.apps: AppDirectory | None = None
        self.metrics = ControlPlaneMetrics()
        self.metrics_server: MetricsServer | None = None
        #: Every background loop of this process; one that dies sets ``supervisor.failed``.
        self.supervisor = Supervisor("control-plane")
        self.admission = Admission(
            max_in_flight=settings.max_in_flight,
            max_lists=settings.max_lists_in_flight,
            max_lists_waiting=settings.max_lists_waiting,
            max_waiters=settings.max_in_flight,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        #: The handler of each endpoint by name, for requests on a tenant's subjects.
        self._tenant_routes: dict[str, Callable[[Request], Awaitable[None]]] = {}
        self._tenant_sub: Subscription | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        if self.settings.metrics_port != METRICS_DISABLED:
            # First: a taken port fails the start before anything else is started.
            self.metrics_server = await serve_metrics(
                self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port,
                before_scrape=self.metrics.refresh,
                hint="set MNEMOS_CP_METRICS_PORT to a free port, 0 for any, -1 for none",
            )
        self._started = True
        self.layout = await ensure_layout(self.js, self.names, self._layout_options, owner=True)
        self.publisher = Publisher(self.nc)
        await self.publisher.start()
        self.jobs = JobStore(self.publisher, self.layout.jobs, self.names.jobs_bucket)
        if self.settings.run_record_delay_s > 0:
            self.deferred = DeferredRecords(
                self.jobs, self.js, self.names.dispatch_stream, self.settings.run_record_delay_s
            )
            self.deferred.start(self.supervisor)
        self.catalog = ModelCatalog(self.layout.models)
        await self.catalog.start(self.supervisor)
        self.pools = PoolDirectory(self.layout.pools, self.layout.autoscaler, self.catalog)
        await self.pools.start(self.supervisor)
        self.apps = AppDirectory(self.layout.apps, self.catalog, self.pools)
        await self.apps.start(self.supervisor)
        self.depth = QueueDepth(self.nc, self.names, self.settings.max_queued_per_runtime,
                                self.settings.queue_depth_refresh_s, self.supervisor)
        await self.depth.refresh()
        self.index = JobIndex(self.layout.jobs)
        await patiently(self.index.open, "open the job index")
        self.supervisor.spawn("job-index", self.index.follow())
        self.quotas = TenantQuotas(self.layout.tenants, self.index)
        await self.quotas.start(self.supervisor)
        self.reaper = Reaper(
            self.nc, self.names, self.layout.workers, self.jobs, self.index,
            JobActions(requeue=self._dispatch_once, redispatch=self._redispatch, message_exists=self._queues,
                       announce=self._announce_final, drop_message=self._drop_dispatch_message,
                       signal_cancel=self._signal_cancel),
            ReaperTimings(timeout_grace_s=self.settings.timeout_grace_s,
                          cancel_confirm_s=self.settings.cancel_confirm_s),
            self.supervisor,
        )
        await self.reaper.start()
        self.metrics.watch(self.depth, self.reaper)
        # Every declared endpoint (mnemos.endpoints) with its handler, or start() fails here.
        routes = bind({
            JOBS_SUBMIT: self._submit,
            JOBS_RUN: self._run,
            JOBS_START: self._start,
            JOBS_GET: self._get,
            JOBS_LIST: self._list,
            JOBS_CANCEL: self._cancel,
            JOBS_RETRY: self._retry,
            WORKERS_LIST: self._workers_list,
            MODELS_LIST: self._models_list,
            MODELS_GET: self._models_get,
            POOLS_LIST: self._pools_list,
            POOLS_GET: self._pools_get,
            POOLS_SET: self._pools_set,
            POOLS_DELETE: self._pools_delete,
            TENANTS_LIST: self._tenants_list,
            TENANTS_GET: self._tenants_get,
            TENANTS_SET: self._tenants_set,
            TENANTS_DELETE: self._tenants_delete,
            APPS_LIST: self._apps_list,
            APPS_GET: self._apps_get,
            APPS_DEPLOY: self._apps_deploy,
            ACTORS_LIST: self._actors_list,
        })
        self.service = await add_service(
            self.nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="MNEMOS control plane: job API, dispatch and state over JetStream",
            metadata={"namespace": self.names.prefix},
            queue_group=self.names.api_queue_group,
            stats_handler=self.metrics.micro,
        )
        for endpoint, handler in routes:
            served = self._tenant_routes[endpoint.name] = self._concurrent(handler, endpoint.micro_name)
            await self.service.add_endpoint(
                name=endpoint.micro_name,
                subject=endpoint.subject(self.names),
                handler=served,
                metadata={"endpoint": endpoint.name},
            )
        # Each endpoint again under every tenant's own subjects (mnemos.tenant.<tenant>.api.*):
        # there the tenant is the subject's, which NATS permissions hold a tenant's
        # credentials to, not a header its client could leave out or forge.
        self._tenant_sub = await self.nc.subscribe(self.names.tenant_api_all(), queue=self.names.api_queue_group,
                                                   cb=self._tenant_request)
        await barrier(self.nc)  # every endpoint is subscribed on the server when start() returns
        log.info("control plane serving %s.* (service id %s)", self.names.api_prefix, self.service.id)

    async def stop(self) -> None:
        """Stop taking requests, finish in-flight ones (bounded), then release the catalog."""
        if not self._started:
            return
        self._started = False
        if self._tenant_sub is not None:
            await self._tenant_sub.unsubscribe()
            self._tenant_sub = None
        if self.service is not None:
            await self.service.stop()
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.reaper is not None:
            await self.reaper.stop()
        if self.deferred is not None:
            await self.deferred.stop()
        await self.supervisor.stop()
        if self.catalog is not None:
            await self.catalog.stop()
        if self.depth is not None:
            await self.depth.close()
        if self.publisher is not None:
            await self.publisher.close()
        metrics_server, self.metrics_server = self.metrics_server, None
        if metrics_server is not None:
            await metrics_server.close()
        log.info("control plane stopped")
        self.supervisor.raise_if_failed()

    async def wait_failed(self) -> BaseException:
        """Return once a background loop of this process died (its error)."""
        await self.supervisor.failed.wait()
        assert self.supervisor.error is not None
        return self.supervisor.error

    async def __aenter__(self) -> "ControlPlane":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ plumbing

    def _concurrent(
        self, fn: Callable[[Request], Awaitable[None]], endpoint: str
    ) -> Callable[[Request], Awaitable[None]]:
        """Run each request in its own task (nats-py awaits handlers one by one otherwise);
        shed it at once, without waiting, when this process is at capacity."""

        async def handler(req: Request) -> None:
            try:
                self.admission.admit()
            except Unavailable as e:
                await self._respond_error(req, e)
                self._account(endpoint, 0, e)
                return
            task = asyncio.create_task(self._serve(fn, req, endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handler

    async def _tenant_request(self, msg: Msg) -> None:
        """A request on a tenant's subject: the endpoint it names, for that tenant."""
        req = Request(msg)
        parsed = self.names.parse_tenant_api_subject(msg.subject)
        handler = self._tenant_routes.get(parsed[1]) if parsed is not None else None
        if handler is None:
            await self._respond_error(req, InvalidRequest(f"no endpoint on {msg.subject}"))
            return
        await handler(req)

    def _account(self, endpoint: str, elapsed_ns: int, error: MnemosError | None) -> None:
        """Count an answered (or shed) request of micro endpoint ``endpoint``: in the
        Prometheus metrics and in what ``$SRV.STATS`` shows (nats.micro sees only the
        handler that starts the task; see :class:`~control_plane.metrics.MicroStats`)."""
        self.metrics.request(endpoint, error.code if error is not None else OK, elapsed_ns / 1e9)
        self.metrics.micro.served(endpoint, elapsed_ns, error)

    async def _serve(self, fn: Callable[[Request], Awaitable[None]], req: Request, endpoint: str) -> None:
        started = time.perf_counter_ns()
        error: MnemosError | None = None
        try:
            if len(req.data) > self.settings.max_request_bytes:
                raise PayloadTooLarge(
                    f"request body is {len(req.data)} bytes; the limit is {self.settings.max_request_bytes}"
                )
            await fn(req)
        except MnemosError as e:
            error = e
            await self._respond_error(req, e)
        except Exception as e:
            mapped = unavailable_from(e)
            if mapped is None:
                log.exception("unexpected error serving %s", req.subject)
            error = mapped or Internal(f"{type(e).__name__}: {e}")
            await self._respond_error(req, error)
        finally:
            self.admission.release()
            self._account(endpoint, time.perf_counter_ns() - started, error)

    async def _respond_error(self, req: Request, err: MnemosError) -> None:
        if not _reply_subject(req):
            log.warning("dropping error for a request without reply subject on %s: %r", req.subject, err)
            return
        body = encode(ErrorReply(error=err.info()))
        try:
            await req.respond_error(str(err.status), err.message, data=body)
        except Exception as e:  # the requester cannot be told (connection lost): log, go on
            log.warning("could not send error %s on %s: %r", err.code, req.subject, e)

    async def _respond(self, req: Request, msg: Any) -> None:
        if _reply_subject(req):
            await req.respond(encode(msg))

    def _ready(self) -> tuple[JobStore, ModelCatalog, Layout]:
        if self.jobs is None or self.catalog is None or self.layout is None:
            raise Unavailable("control plane is not started")
        return self.jobs, self.catalog, self.layout

    @property
    def _index(self) -> JobIndex:
        if self.index is None:
            raise Unavailable("control plane is not started")
        return self.index

    @property
    def _publisher(self) -> Publisher:
        if self.publisher is None:
            raise Unavailable("control plane is not started")
        return self.publisher

    # ------------------------------------------------------------------ submit / run

    async def _submit(self, req: Request) -> None:
        record, _ = await self._accept(decode(req.data, JobSpec), reply_to=None, tenant=_tenant(req))
        await self._respond(req, record)

    async def _run(self, req: Request) -> None:
        reply_to = _reply_subject(req)
        if not reply_to:
            raise ValidationFailed("jobs.run needs a reply subject (use request, not publish)")
        record, created = await self._accept(decode(req.data, JobSpec), reply_to=reply_to, tenant=_tenant(req))
        if created:
            return  # whoever finishes the job answers the reply subject stored in it
        if not record.terminal:  # the same idempotency key is running: answer when it ends
            async with self.admission.waiting():
                record = await self._wait_terminal(record.job_id, record.spec.timeout_seconds + 60.0)
        await self._respond(req, record)

    async def _start(self, req: Request) -> None:
        """Queue a job and answer with its record at once; whoever finishes it answers the
        same subject again (the record's ``reply_to``), as for ``jobs.run``. The record is
        written at once, as for ``jobs.submit``: the caller may read or cancel the job the
        moment it has the first answer."""
        reply_to = _reply_subject(req)
        if not reply_to:
            raise ValidationFailed("jobs.start needs a reply subject (use request, not publish)")
        spec = decode(req.data, JobSpec)
        if spec.idempotency_key is not None:
            raise ValidationFailed("jobs.start takes no idempotency_key: use jobs.submit and follow the job")
        record, _ = await self._accept(spec, reply_to=reply_to, tenant=_tenant(req), defer_record=False)
        await self._respond(req, record)

    async def _wait_terminal(self, job_id: str, timeout: float) -> JobRecord:
        """Follow a job's result stream until its final message; the record then."""
        jobs, _, _ = self._ready()
        sub = await self.js.subscribe(self.names.results_subject(job_id), ordered_consumer=True)
        try:
            async with asyncio.timeout(timeout):
                record, _ = await jobs.get(job_id)
                while not record.terminal:
                    msg = await sub.next_msg(timeout=None)
                    final = decode_result(msg.data)
                    if isinstance(final, ResultFinal) and final.status in TERMINAL_STATUSES:
                        record, _ = await jobs.get(job_id)
        except TimeoutError as e:
            raise JobTimeout(f"job {job_id} did not finish within {timeout:g}s") from e
        finally:
            await sub.unsubscribe()
        return record

    async def _accept(
        self, spec: JobSpec, reply_to: str | None, tenant: str | None, *, defer_record: bool = True
    ) -> tuple[JobRecord, bool]:
        """Validate and queue a job: (record, True); or (the existing job, False) for an
        idempotency key seen within the window. ``defer_record=False``: write the record of
        a job with a ``reply_to`` at once (``jobs.start``), and say so on its message.

        The dispatch message is written first: once it is stored the job is accepted and
        cannot be lost, whatever fails next. It carries revision 0, so the claiming worker
        creates the record if it does not exist yet. ``jobs.submit`` then writes the
        ``queued`` record before answering (so it can be read at once); ``jobs.run`` leaves
        that to the claim (or to the deferred writer, if no worker claims it in time).

        Idempotency keys are scoped by tenant: two tenants using the same key get two jobs.
        """
        jobs, catalog, layout = self._ready()
        record = await self._new_record(spec, catalog, reply_to, tenant)
        if self.depth is not None:
            self.depth.check(record.runtime)
        if self.quotas is not None:
            self.quotas.check(tenant)
        claimed_key = False
        if spec.idempotency_key is not None:
            existing, existing_id = await self._claim_idempotency_key(
                _idempotency_hash(spec.idempotency_key, tenant), record.job_id, layout, jobs
            )
            if existing is not None:
                return existing, False
            if existing_id is not None:
                # The key's job is not readable: its first submission may have failed after
                # the key, or its record may still be on its way. Dispatch it (again) under
                # the same id: the dispatch stream drops a duplicate message id.
                record.job_id = existing_id
            else:
                claimed_key = True
        data = encode(record)
        deferred = self.deferred if defer_record and reply_to is not None and spec.idempotency_key is None else None
        try:
            seq = await self._dispatch(record, 0, data, record_follows=reply_to is not None and not defer_record)
        except MnemosError:
            if claimed_key:  # not accepted: a retry must make a new job
                await self._release_idempotency_key(_idempotency_hash(spec.idempotency_key or "", tenant), layout)
            raise
        record.queued_seq = seq
        if deferred is not None:
            deferred.add(record, self.names.dispatch_consumer(
                record.runtime, spec.priority, model_token(spec.model.family, spec.model.version)), seq)
        else:
            try:
                await jobs.create(record)
            except Conflict:
                pass  # a worker claimed it first and wrote the record
            except MnemosError as e:  # accepted all the same: the claim writes the record
                log.warning("job %s queued, but its record could not be written yet: %r", record.job_id, e)
        log.debug("job %s queued (%s p%d)", record.job_id, record.runtime, spec.priority)
        return record, True

    async def _new_record(
        self, spec: JobSpec, catalog: ModelCatalog, reply_to: str | None, tenant: str | None
    ) -> JobRecord:
        ref = spec.model
        if ref.runtime is not None and ref.runtime not in RUNTIMES:
            raise UnknownRuntime(f"unknown runtime {ref.runtime!r}; known: {', '.join(RUNTIMES)}")
        try:
            model = await catalog.get(ref.family, ref.version)
        except ModelNotFound as e:
            raise UnknownModel(f"model {ref.family}:{ref.version} is not registered") from e
        runtime = ref.runtime or model.runtime
        if runtime != model.runtime and not (runtime in TEXT_RUNTIMES and model.runtime in TEXT_RUNTIMES):
            raise ValidationFailed(
                f"model {model.name} is registered for runtime {model.runtime!r}, not {runtime!r}"
            )
        defaults = model.runtime_config if runtime == model.runtime else {}
        job_runtime_config(runtime, defaults, ref.runtime_config)
        if runtime in TEXT_RUNTIMES and (spec.input.prompt is None) == (spec.input.messages is None):
            raise ValidationFailed(f"runtime {runtime!r} needs exactly one of input.prompt and input.messages")
        check_job(spec)
        return lifecycle.accept(spec, runtime, utcnow(), tenant=tenant, reply_to=reply_to)

    async def _claim_idempotency_key(
        self, hkey: str, job_id: str, layout: Layout, jobs: JobStore
    ) -> tuple[JobRecord | None, str | None]:
        """Map the hashed key ``hkey`` to ``job_id``: (None, None). If it already maps to a
        job: that job's record, or (None, its id) when the record cannot be read (yet)."""
        kv = layout.idempotency
        while True:
            try:
                await kv.create(hkey, job_id.encode())
                return None, None
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(hkey)
            except KeyNotFoundError:
                continue  # released meanwhile: claim it
            existing_id = (entry.value or b"").decode()
            for _ in range(10):  # the holder may be writing its record right now
                try:
                    record, _ = await jobs.get(existing_id)
                    return record, None
                except JobNotFound:
                    await asyncio.sleep(0.02)
            return None, existing_id

    async def _release_idempotency_key(self, hkey: str, layout: Layout) -> None:
        try:
            await layout.idempotency.delete(hkey)
        except Exception as e:  # best effort: a later submit takes a stale key over anyway
            log.warning("could not release an idempotency key: %r", e)

    async def _dispatch(
        self, record: JobRecord, revision: int, record_json: bytes | None = None, *, record_follows: bool = False
    ) -> int:
        """Queue ``record`` (at KV ``revision``, 0: not written yet) for its runtime and
        priority; the stream sequence. A repeated dispatch of the same generation within the
        stream's duplicate window is stored once (``Nats-Msg-Id``). ``record_follows``: the
        queued record of a job with a ``reply_to`` is written right after (see
        :data:`~mnemos.names.HDR_RECORD_FOLLOWS`)."""
        return (await self._dispatch_once(record, revision, record_json, record_follows=record_follows))[0]

    async def _dispatch_once(
        self, record: JobRecord, revision: int, record_json: bytes | None = None, *, msg_id: str | None = None,
        record_follows: bool = False,
    ) -> tuple[int, bool]:
        """:meth:`_dispatch`, also saying whether the message was stored now (False: the
        stream already held this generation's message)."""
        spec = record.spec
        subject = self.names.dispatch_subject(record.runtime, spec.priority, spec.model.family, spec.model.version)
        headers = {HDR_MSG_ID: msg_id or f"{record.job_id}.g{record.dispatch}"}
        if record_follows:
            headers[HDR_RECORD_FOLLOWS] = "1"
        try:
            return await self._publisher.publish_once(subject, encode_dispatch(record, revision, record_json),
                                                      headers=headers)
        except MnemosError as e:
            raise Unavailable(f"could not queue job {record.job_id}: {e.message}") from e

    async def _redispatch(self, record: JobRecord, revision: int) -> int:
        """A new dispatch message for the current generation, whose first one is gone."""
        msg_id = f"{record.job_id}.g{record.dispatch}.r{time.time_ns()}"
        return (await self._dispatch_once(record, revision, msg_id=msg_id))[0]

    async def _queues(self, seq: int, job_id: str, generation: int) -> bool:
        """Whether dispatch message ``seq`` is there and queues ``job_id`` at ``generation``
        (read from the stream's leader: a replica may not have it yet)."""
        try:
            msg = await self.js.get_msg(self.names.dispatch_stream, seq, direct=False)
        except NotFoundError:
            return False
        except Exception as e:
            raise unavailable_from(e) or Unavailable(f"cannot read dispatch message {seq}: {e!r}") from e
        try:
            queued = decode(msg.data or b"", Dispatch).record
        except MnemosError:
            return False
        return queued.job_id == job_id and queued.dispatch == generation

    async def _drop_dispatch_message(self, seq: int) -> None:
        """Remove a dispatch message that no longer stands for work (a dead worker's)."""
        try:
            await self.js.delete_msg(self.names.dispatch_stream, seq)
        except Exception as e:  # already acked and gone is the usual case
            log.debug("dispatch message %d not deleted: %r", seq, e)

    async def _signal_cancel(self, job_id: str, reason: str) -> None:
        """Tell whichever worker runs ``job_id`` to stop it (the reaper sends it again until
        the cancellation is confirmed, and confirms it itself past ``cancel_confirm_s``)."""
        await self.nc.publish(self.names.cancel_subject(job_id), encode(CancelJob(job_id=job_id, reason=reason)))

    async def _announce_final(self, record: JobRecord) -> None:
        """Final message on the result stream, and the answer to a waiting ``jobs.run``."""
        final = ResultFinal.of(record)
        if record.terminal:
            self.metrics.job_finished(record.status, record.runtime)
        await self._publisher.publish(self.names.results_subject(record.job_id), encode(final))
        if record.reply_to:
            await self.nc.publish(record.reply_to, encode(record))

    # ------------------------------------------------------------------ queries

    async def _get(self, req: Request) -> None:
        jobs, _, _ = self._ready()
        body = decode(req.data, GetJob)
        record, _ = await jobs.get(body.job_id)
        await self._respond(req, self._explain_wait(_visible(record, _tenant(req))))

    def _explain_wait(
        self, record: JobRecord, capacity: dict[tuple[str, str], tuple[WaitReason, str, str | None]] | None = None
    ) -> JobRecord:
        """Fill in why a queued job waits, from the live workers the reaper follows and the
        pool that serves it (``capacity``: what was found per runtime and model for the
        other jobs of one answer)."""
        if record.status != "queued" or self.reaper is None:
            return record
        capacity = {} if capacity is None else capacity
        key = (record.runtime, f"{record.spec.model.family}:{record.spec.model.version}")
        if key not in capacity:
            capacity[key] = self._capacity(*key)
        reason, detail, pool = capacity[key]
        entry = self.index.entries.get(record.job_id) if self.index is not None else None
        if entry is not None and entry.queued_since is not None:
            waited = time.monotonic() - entry.queued_since
        else:
            waited = (utcnow() - record.updated_at).total_seconds()
        record.waiting = Waiting(reason=reason, waited_s=round(max(0.0, waited), 3), detail=detail, pool=pool)
        return record

    def _capacity(self, runtime: str, model: str) -> tuple[WaitReason, str, str | None]:
        """Why a job of ``runtime`` for ``model`` waits now, what the control plane sees,
        and the pool the autoscaler grows for it (if any)."""
        assert self.reaper is not None
        workers = [w for w in self.reaper.live.values() if runtime in w.runtimes]
        serving = [w for w in workers if w.status in ("idle", "busy")]
        served = self.pools.serving(runtime, model) if self.pools is not None else None
        pool_note = ""
        if served is not None:
            spec, status = served
            if status is None:
                pool_note = f"; pool {spec.name}: no autoscaler has acted on it yet"
            else:
                pool_note = (f"; pool {spec.name}: {status.ready} ready, {status.starting} starting, "
                             f"desired {status.desired} of max {spec.max_workers}")
                if status.at_max:
                    pool_note += " (at max_workers: the backlog waits for a free slot)"
        if not serving:
            others = f" ({len(workers)} paused, draining or starting)" if workers else ""
            if served is not None:
                return ("waiting_for_capacity", f"no live worker serves runtime {runtime} yet{others}{pool_note}",
                        served[0].name)
            return "no_worker_for_runtime", f"no live worker serves runtime {runtime}{others}", None
        free = sum(w.free_slots for w in serving)
        return ("waiting_for_capacity", f"{len(serving)} worker(s) serve runtime {runtime}; {free} free slot(s)"
                f"{pool_note}", served[0].name if served is not None else None)

    async def _list(self, req: Request) -> None:
        """A page from the job index: bounded work whatever the bucket holds (the page's
        records are read, nothing else)."""
        jobs, catalog, _ = self._ready()
        q = decode(req.data or b"{}", ListJobs)
        model: tuple[str, str] | None = None
        if q.model is not None:
            rec = catalog.find(q.model)
            if rec is None:
                raise ModelNotFound(f"model {q.model!r} is not registered")
            model = (rec.family, rec.version)
        statuses: set[str] | None = set(q.status) if q.status else None
        tenant = _tenant(req)
        index = self._index
        if not index.ready.is_set():
            try:
                await asyncio.wait_for(index.ready.wait(), timeout=5.0)
            except TimeoutError:
                raise Unavailable("the job index is still loading; retry shortly",
                                  details={"retry_after_s": 1}) from None
        async with self.admission.list_turn():
            ids, next_cursor = index.page(tenant=tenant, statuses=statuses, model=model, cursor=q.cursor,
                                          limit=q.limit, max_scan=self.settings.list_max_scan,
                                          dead_letter=q.dead_letter)
            records = await asyncio.gather(*(self._read_listed(jobs, job_id) for job_id in ids))
        capacity: dict[tuple[str, str], tuple[WaitReason, str, str | None]] = {}
        page = [
            self._explain_wait(r, capacity) for r in records
            if r is not None and (tenant is None or r.tenant == tenant)
            and (statuses is None or r.status in statuses)
            and (model is None or (r.spec.model.family, r.spec.model.version) == model)
            and (not q.dead_letter or r.dead_letter)
        ]
        await self._respond(req, JobList(jobs=page, next_cursor=next_cursor))

    async def _read_listed(self, jobs: JobStore, job_id: str) -> JobRecord | None:
        """A listed job's record; None (and out of the index) if it expired meanwhile."""
        try:
            return (await jobs.get(job_id))[0]
        except JobNotFound:
            self._index.forget(job_id)
            return None

    async def _workers_list(self, req: Request) -> None:
        """The live workers as the reaper knows them (no read: heartbeats keep it current)."""
        q = decode(req.data or b"{}", ListWorkers)
        live = self.reaper.live.values() if self.reaper is not None else ()
        workers = sorted((w for w in live if q.runtime is None or q.runtime in w.runtimes),
                         key=lambda w: w.worker_id)
        await self._respond(req, WorkerList(workers=workers))

    async def _models_list(self, req: Request) -> None:
        _, catalog, _ = self._ready()
        q = decode(req.data or b"{}", ListModels)
        models: list[ModelRecord] = [m for m in catalog.list() if q.runtime is None or m.runtime == q.runtime]
        await self._respond(req, ModelList(models=models))

    async def _models_get(self, req: Request) -> None:
        _, catalog, _ = self._ready()
        q = decode(req.data, GetModel)
        await self._respond(req, await catalog.resolve(q.name))

    # ------------------------------------------------------------------ pools

    def _pool_directory(self, req: Request, *, change: bool) -> PoolDirectory:
        if self.pools is None:
            raise Unavailable("control plane is not started")
        if change and _tenant(req) is not None:
            raise Forbidden("pools are the operator's: a tenant's request cannot change them")
        return self.pools

    async def _pools_list(self, req: Request) -> None:
        decode(req.data or b"{}", ListPools)
        await self._respond(req, self._pool_directory(req, change=False).list())

    async def _pools_get(self, req: Request) -> None:
        q = decode(req.data, GetPool)
        await self._respond(req, await self._pool_directory(req, change=False).get(q.name))

    async def _pools_set(self, req: Request) -> None:
        body = decode(req.data, SetPool)
        await self._respond(req, await self._pool_directory(req, change=True).set(body.pool))

    async def _pools_delete(self, req: Request) -> None:
        body = decode(req.data, RemovePool)
        await self._respond(req, await self._pool_directory(req, change=True).delete(body.name))

    # ------------------------------------------------------------------ tenants

    def _tenant_quotas(self, req: Request, *, change: bool, tenant: str | None = None) -> TenantQuotas:
        if self.quotas is None:
            raise Unavailable("control plane is not started")
        caller = _tenant(req)
        if change and caller is not None:
            raise Forbidden("quotas are the operator's: a tenant's request cannot change them")
        if caller is not None and tenant is not None and tenant != caller:
            raise TenantNotFound(f"no quota for tenant {tenant!r}")  # another tenant's: not there for it
        return self.quotas

    async def _tenants_list(self, req: Request) -> None:
        decode(req.data or b"{}", ListTenants)
        listed = self._tenant_quotas(req, change=False).list()
        caller = _tenant(req)
        if caller is not None:
            listed = TenantList(tenants=[t for t in listed.tenants if t.quota.tenant == caller])
        await self._respond(req, listed)

    async def _tenants_get(self, req: Request) -> None:
        q = decode(req.data, GetTenant)
        await self._respond(req, await self._tenant_quotas(req, change=False, tenant=q.tenant).get(q.tenant))

    async def _tenants_set(self, req: Request) -> None:
        body = decode(req.data, SetTenant)
        await self._respond(req, await self._tenant_quotas(req, change=True).set(body.quota))

    async def _tenants_delete(self, req: Request) -> None:
        body = decode(req.data, RemoveTenant)
        await self._respond(req, await self._tenant_quotas(req, change=True).delete(body.tenant))

    # ------------------------------------------------------------------ apps

    def _app_directory(self, req: Request, *, change: bool) -> AppDirectory:
        if self.apps is None:
            raise Unavailable("control plane is not started")
        if change and _tenant(req) is not None:
            raise Forbidden("deploying sizes the operator's pools: a tenant's request cannot deploy")
        return self.apps

    async def _apps_list(self, req: Request) -> None:
        decode(req.data or b"{}", ListApps)
        await self._respond(req, self._app_directory(req, change=False).list())

    async def _apps_get(self, req: Request) -> None:
        q = decode(req.data, GetApp)
        await self._respond(req, await self._app_directory(req, change=False).get(q.name))

    async def _apps_deploy(self, req: Request) -> None:
        body = decode(req.data, DeployApp)
        await self._respond(req, await self._app_directory(req, change=True).deploy(body))

    async def _actors_list(self, req: Request) -> None:
        q = decode(req.data or b"{}", ListActors)
        _, _, layout = self._ready()
        await self._respond(req, await list_actors(layout.actors, q.app))

    # ------------------------------------------------------------------ cancel / retry

    async def _cancel(self, req: Request) -> None:
        jobs, _, _ = self._ready()
        body = decode(req.data, CancelJob)
        reason = body.reason or "cancelled by request"
        tenant = _tenant(req)
        changed = False

        def change(rec: JobRecord) -> JobRecord | None:
            nonlocal changed
            _visible(rec, tenant)
            changed = lifecycle.request_cancel(rec, reason)
            return rec if changed else None

        record, _ = await jobs.mutate(body.job_id, change)
        # Unchanged: it was cancelled (announced then) or is cancelling (the reaper re-signals).
        if changed and record.status == "cancelled":
            if record.attempt == 0 and record.queued_seq is not None:
                await self._drop_dispatch_message(record.queued_seq)  # never to be pulled
            await self._announce_final(record)
        elif changed:
            await self._signal_cancel(record.job_id, reason)
        log.info("job %s %s: %s", record.job_id, record.status, reason)
        await self._respond(req, record)

    async def _retry(self, req: Request) -> None:
        jobs, _, _ = self._ready()
        body = decode(req.data, RetryJob)
        tenant = _tenant(req)

        def change(rec: JobRecord) -> JobRecord | None:
            _visible(rec, tenant)
            lifecycle.requeue_by_request(rec)
            return rec

        before = _visible((await jobs.get(body.job_id))[0], tenant)
        if self.quotas is not None:
            self.quotas.check(tenant)
        record, revision = await jobs.mutate(body.job_id, change)
        try:
            await self._dispatch(record, revision)
        except Unavailable:
            # Not queued after all: put the record back as it was, so it does not wait forever.
            try:
                await jobs.update(before, revision)
            except MnemosError as e:
                log.error("job %s is marked queued but could not be queued: %r", record.job_id, e)
            raise
        log.info("job %s re-queued by request (after attempt %d)", record.job_id, record.attempt)
        await self._respond(req, record)


def _idempotency_hash(key: str, tenant: str | None) -> str:
    scoped = key if tenant is None else f"{tenant}\x00{key}"
    return hashlib.sha256(scoped.encode()).hexdigest()


def _tenant(req: Request) -> str | None:
    """The tenant a request acts for: the tenant of its subject (``mnemos.tenant.<tenant>.api.*``,
    where a header changes nothing), else the ``Mnemos-Tenant`` header (the operator's and
    the gateway's subjects); None: every tenant."""
    parsed = Names.parse_tenant_api_subject(req.subject)
    tenant = parsed[0] if parsed is not None else (req.headers or {}).get(HDR_TENANT)
    if tenant is None:
        return None
    try:
        return validate_tenant(tenant)
    except ValueError as e:
        where = "the subject" if parsed is not None else f"header {HDR_TENANT}"
        raise ValidationFailed(f"{where}: {e}") from None


def _visible(record: JobRecord, tenant: str | None) -> JobRecord:
    """``record`` if ``tenant`` may see it; another tenant's job does not exist for it."""
    if tenant is not None and record.tenant != tenant:
        raise JobNotFound(f"no job {record.job_id}")
    return record


def _reply_subject(req: Request) -> str:
    return req._msg.reply  # noqa: SLF001 - nats.micro exposes no accessor for it
