"""The MNEMOS client SDK: submit, run, watch and manage jobs over NATS request/reply.

    async with await Client.connect() as client:
        done = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 2]))
        job = await client.submit(job_spec("demo-gpt2:v1", prompt="hello", max_tokens=32))
        async for item in client.stream(job.job_id): ...

Errors from the control plane arrive as the one envelope and are raised as the matching
:mod:`mnemos.errors` class. A client that is not connected raises :class:`NotConnected`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as jsapi

from mnemos.auth import creds_identity
from mnemos.config import NatsSettings
from mnemos.connection import connect, refused_publish, unavailable_from
from mnemos.endpoints import (
    ACTORS_LIST,
    APPS_DEPLOY,
    APPS_GET,
    APPS_LIST,
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
    WORKERS_LIST,
    Endpoint,
)
from mnemos.errors import Forbidden, JobTimeout, NotConnected, Unavailable, ValidationFailed, from_info
from mnemos.messages import (
    ActivateActor,
    ActorActivation,
    ActorCall,
    ActorReply,
    ActorView,
    ListActors,
    AppDeployed,
    AppRecord,
    DeployApp,
    GetApp,
    ListApps,
    TERMINAL_STATUSES,
    CancelJob,
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
    ModelRecord,
    PoolSpec,
    PoolView,
    RemovePool,
    SetPool,
    GetTenant,
    ListTenants,
    RemoveTenant,
    SetTenant,
    TenantQuota,
    TenantView,
    ResultFinal,
    ResultMessage,
    decode_result,
    RetryJob,
    WorkerRecord,
    decode,
    encode,
)
from mnemos.names import HDR_PING, HDR_SERVICE_ERROR_CODE, Names, validate_tenant

__all__ = ["Client", "job_spec"]

Req = TypeVar("Req")
Rep = TypeVar("Rep")

#: An actor call unanswered for this long has its holder checked (every as long again).
_ACTOR_PROBE_S = 1.0
#: A stream with no message for this long is checked against the job record.
_STREAM_IDLE_CHECK_S = 5.0


def job_spec(
    model: str,
    *,
    prompt: str | None = None,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    runtime: str | None = None,
    runtime_config: dict[str, Any] | None = None,
    function: str | None = None,
    priority: int = 5,
    timeout_seconds: float = 300.0,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    queue_timeout_seconds: float | None = None,
    **parameters: Any,
) -> JobSpec:
    """Build a :class:`JobSpec` from ``"family:version"`` and keyword arguments.

    Extra keywords are generation parameters (``max_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``stop``, ``seed``). ``function`` picks a function of a python model.
    ``queue_timeout_seconds``: the job ends ``timeout`` (code ``queue_timeout``) if no
    worker takes it within that long.
    """
    runtime_config = dict(runtime_config or {})
    if function is not None:
        runtime_config["function"] = function
    family, sep, version = model.partition(":")
    if not sep:
        raise ValidationFailed(f"model must be 'family:version', got {model!r}")
    raw = {
        "model": {"family": family, "version": version, "runtime": runtime, "runtime_config": runtime_config},
        "input": {"prompt": prompt, "parameters": parameters, "args": args or [], "kwargs": kwargs or {}},
        "priority": priority,
        "timeout_seconds": timeout_seconds,
        "metadata": metadata or {},
        "idempotency_key": idempotency_key,
        "queue_timeout_seconds": queue_timeout_seconds,
    }
    return decode(encode(raw), JobSpec)


class _Replies:
    """One wildcard subscription per connection for requests that are answered more than
    once (``jobs.start``): each request gets a subject under it and a queue of its answers."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Queue[Msg]] = {}

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[tuple[str, asyncio.Queue[Msg]]]:
        """A reply subject and the queue its answers arrive in, for the block's duration."""
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    prefix = self.nc.new_inbox()
                    self._sub = await self.nc.subscribe(prefix + ".*", cb=self._on_answer)
                    self._prefix = prefix
        token = str(next(self._ids))
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting[token] = answers
        try:
            yield f"{self._prefix}.{token}", answers
        finally:
            self._waiting.pop(token, None)

    async def _on_answer(self, msg: Msg) -> None:
        answers = self._waiting.get(msg.subject.rpartition(".")[2])
        if answers is not None:  # one that came after its caller stopped waiting is dropped
            answers.put_nowait(msg)


class Client:
    """Async client of one MNEMOS namespace."""

    def __init__(
        self,
        nc: NATS | None,
        names: Names | None = None,
        *,
        request_timeout: float = 10.0,
        tenant: str | None = None,
    ) -> None:
        self._nc = nc
        self._owned = False
        self.names = names or Names()
        self.request_timeout = request_timeout
        #: Act for this tenant: its jobs are recorded with it, and only its jobs are visible.
        #: Its requests go to the tenant's own subjects (``mnemos.tenant.<tenant>.api.*``),
        #: which a tenant's NATS credentials are held to.
        if tenant is not None:
            try:
                validate_tenant(tenant)
            except ValueError as e:
                raise ValidationFailed(str(e)) from None
        self.tenant = tenant
        #: Answers to requests answered twice (``jobs.start``), shared by the connection's clients.
        self._replies = _Replies(nc) if nc is not None else None

    @classmethod
    async def connect(
        cls, settings: NatsSettings | None = None, *, request_timeout: float = 10.0, tenant: str | None = None,
        name: str = "mnemos-client",
    ) -> "Client":
        """Connect to NATS as described by ``settings`` (default: ``MNEMOS_*`` environment);
        ``name`` is the connection's name (what ``nats server report connections`` shows).
        Credentials minted for a tenant (``service.<tenant>``) make it act for that tenant."""
        settings = settings or NatsSettings()
        if tenant is None and settings.creds_file is not None:
            identity = creds_identity(settings.creds_file)
            tenant = identity.tenant if identity is not None else None
        client = cls(await connect(settings, name), settings.names, request_timeout=request_timeout, tenant=tenant)
        client._owned = True
        return client

    def for_tenant(self, tenant: str | None) -> "Client":
        """A client on the same connection acting for ``tenant`` (closing it closes nothing)."""
        client = Client(self._nc, self.names, request_timeout=self.request_timeout, tenant=tenant)
        client._replies = self._replies
        return client

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and self._owned and not nc.is_closed:
            await nc.drain()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        if self._nc is None or not self._nc.is_connected:
            raise NotConnected("the MNEMOS client is not connected to NATS")
        return self._nc

    # ------------------------------------------------------------------ transport

    async def _call(self, endpoint: Endpoint[Req, Rep], request: Req, timeout: float | None = None) -> Rep:
        """Send ``request`` to ``endpoint``; its reply decoded as ``endpoint.reply``, or the
        error envelope raised as its :mod:`mnemos.errors` class."""
        subject = self._subject(endpoint)
        wait = timeout or self.request_timeout
        try:
            msg = await self.nc.request(subject, encode(request), timeout=wait)
        except nats.errors.NoRespondersError as e:
            raise Unavailable(f"no control plane answers on {subject}") from e
        except nats.errors.TimeoutError as e:
            if refused_publish(self.nc, subject):
                raise Forbidden(f"nats-server refuses {subject} to these credentials") from e
            raise Unavailable(f"{endpoint.name} got no answer within {wait}s") from e
        if msg.headers and HDR_SERVICE_ERROR_CODE in msg.headers:
            raise from_info(decode(msg.data, ErrorReply).error)
        return decode(msg.data, endpoint.reply)

    def _subject(self, endpoint: Endpoint[Any, Any]) -> str:
        """Where a request to ``endpoint`` goes: the tenant's own subject, or (no tenant: the
        operator, every tenant) the endpoint's."""
        if self.tenant:
            return self.names.tenant_api_subject(self.tenant, endpoint.name)
        return endpoint.subject(self.names)

    # ------------------------------------------------------------------ jobs

    async def submit(self, spec: JobSpec) -> JobRecord:
        """Queue a job; returns its record (status ``queued``)."""
        return await self._call(JOBS_SUBMIT, spec)

    async def run(self, spec: JobSpec, timeout: float | None = None) -> JobRecord:
        """Submit and wait for the finished record (the worker answers directly)."""
        wait = timeout if timeout is not None else spec.timeout_seconds + 60.0
        try:
            return await self._call(JOBS_RUN, spec, timeout=wait)
        except Unavailable as e:
            if isinstance(e.__cause__, nats.errors.TimeoutError):
                raise JobTimeout(f"job did not finish within {wait:g}s") from e
            raise

    async def start(self, spec: JobSpec, wait: float) -> JobRecord:
        """Queue a job and wait up to ``wait`` seconds for it to end: its final record, or
        (if it has not ended by then) its record as queued; the job goes on, follow it by
        its id. One request, ``jobs.start``: the control plane answers with the record at
        once, whoever finishes the job answers again. A spec with an idempotency key goes
        through :meth:`submit` and :meth:`wait` instead (``jobs.start`` takes none)."""
        if spec.idempotency_key is not None:
            submitted = await self.submit(spec)
            try:
                return await self.wait(submitted.job_id, timeout=wait)
            except JobTimeout:
                return submitted
        assert self._replies is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        async with self._replies.open() as (reply, answers):
            await self.nc.publish(self._subject(JOBS_START), encode(spec), reply=reply)
            queued: JobRecord | None = None
            while True:
                # The first answer names the job: wait for it as for any request.
                left = deadline - loop.time() if queued is not None else max(self.request_timeout,
                                                                             deadline - loop.time())
                try:
                    msg = await asyncio.wait_for(answers.get(), timeout=max(0.0, left))
                except TimeoutError:
                    if queued is None:
                        raise Unavailable(f"jobs.start got no answer within {left:g}s") from None
                    return queued
                if msg.headers and msg.headers.get("Status") == "503":
                    raise Unavailable(f"no control plane answers on {self._subject(JOBS_START)}")
                if msg.headers and HDR_SERVICE_ERROR_CODE in msg.headers:
                    raise from_info(decode(msg.data, ErrorReply).error)
                record = decode(msg.data, JobRecord)
                if record.terminal:
                    return record
                queued = record

    async def get(self, job_id: str) -> JobRecord:
        return await self._call(JOBS_GET, GetJob(job_id=job_id))

    async def list(
        self,
        *,
        status: builtins.list[str] | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        dead_letter: bool = False,
    ) -> JobList:
        """A page of jobs, newest first; ``dead_letter``: only jobs that ended failed or
        timeout with their retries used up."""
        body = ListJobs(status=status, model=model, limit=limit, cursor=cursor,  # type: ignore[arg-type]
                        dead_letter=dead_letter)
        return await self._call(JOBS_LIST, body, timeout=max(self.request_timeout, 30.0))

    async def cancel(self, job_id: str, reason: str | None = None) -> JobRecord:
        return await self._call(JOBS_CANCEL, CancelJob(job_id=job_id, reason=reason))

    async def retry(self, job_id: str) -> JobRecord:
        return await self._call(JOBS_RETRY, RetryJob(job_id=job_id))

    async def stream(self, job_id: str, *, start_seq: int | None = None) -> AsyncIterator[ResultMessage]:
        """Status changes, chunks and final messages of a job as they are stored, from the
        start (or stream sequence ``start_seq``), until a final message with a terminal status.
        See :meth:`events` (the same, with each message's stream sequence)."""
        async for _seq, item in self.events(job_id, start_seq=start_seq):
            yield item

    async def events(
        self, job_id: str, *, start_seq: int | None = None
    ) -> AsyncGenerator[tuple[int | None, ResultMessage], None]:
        """``(stream sequence, message)`` of a job's result stream, from the start (or
        ``start_seq``), until a final message with a terminal status. The sequence is None
        for a final message built from the record (its stream message expired or was never
        written). Resume after sequence ``n`` with ``start_seq=n + 1``.

        Resumable: it remembers the stream sequence of the last message it yielded, and when
        the connection was re-established it opens a new consumer right after it. (A restarted
        server forgets the ephemeral consumer; nats-py's ordered consumer notices that only
        after two missed 5 s heartbeats, by which time the record check below would have
        ended the stream without the chunks in between.) Every message is yielded once, in
        stream order.
        """
        poll_s = 0.25  # how soon a reconnect is noticed while the stream is quiet
        js = self.nc.jetstream()
        subject = self.names.results_subject(job_id)
        next_seq = start_seq  # the first stream sequence not yielded yet (None: the start)
        loop = asyncio.get_running_loop()

        def live() -> NATS:
            nc = self._nc
            if nc is None or nc.is_closed:
                raise NotConnected("the MNEMOS client is not connected to NATS")
            return nc

        async def subscribe() -> Any:
            config = None
            if next_seq is not None:
                config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
                                              opt_start_seq=next_seq)
            return await js.subscribe(subject, stream=self.names.results_stream, ordered_consumer=True,
                                      config=config)

        async def resubscribe(old: Any) -> Any:
            """A new consumer after the last message yielded; JetStream may still be
            recovering after a restart, so unavailability is retried for a while."""
            await unsubscribe(old)
            deadline = loop.time() + max(self.request_timeout, 30.0)
            while True:
                try:
                    return await subscribe()
                except Exception as e:
                    unavailable = unavailable_from(e)
                    if unavailable is None:
                        raise
                    if loop.time() > deadline:
                        raise unavailable from e
                live()
                await asyncio.sleep(poll_s)

        async def unsubscribe(sub: Any) -> None:
            try:
                await sub.unsubscribe()
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                pass  # the connection is going away and takes the subscription with it

        async def more_stored() -> bool:
            """Whether the stream holds a message of this job not yielded yet."""
            try:
                last = await js.get_last_msg(self.names.results_stream, subject, direct=True)
            except nats.js.errors.NotFoundError:
                return False
            return next_seq is None or (last.seq or 0) >= next_seq

        try:
            sub = await subscribe()
        except Exception as e:
            unavailable = unavailable_from(e)
            if unavailable is None:
                raise
            raise unavailable from e
        reconnects = self.nc.stats["reconnects"]
        reconnected_at = -1e9
        quiet_s = 0.0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=poll_s)
                except nats.errors.TimeoutError:
                    nc = live()
                    if not nc.is_connected:
                        continue  # reconnecting: wait for it
                    if nc.stats["reconnects"] != reconnects:
                        reconnects = nc.stats["reconnects"]
                        reconnected_at, quiet_s = loop.time(), 0.0
                        sub = await resubscribe(sub)
                        continue
                    quiet_s += poll_s
                    if quiet_s < _STREAM_IDLE_CHECK_S:
                        continue
                    quiet_s = 0.0
                    # Quiet for a while: the record is the authority (a result stream can
                    # expire, and a worker can die between recording and announcing).
                    try:
                        record = await self.get(job_id)
                    except NotConnected:
                        raise
                    except Unavailable:
                        if loop.time() - reconnected_at < 2 * _STREAM_IDLE_CHECK_S:
                            continue  # the control plane may still be reconnecting too
                        raise
                    if not record.terminal:
                        continue
                    if await more_stored():  # the consumer fell behind: catch up first
                        sub = await resubscribe(sub)
                        continue
                    yield None, ResultFinal.of(record)
                    return
                seq = msg.metadata.sequence.stream
                if next_seq is not None and seq < next_seq:
                    continue  # yielded before a resubscription
                next_seq, quiet_s = seq + 1, 0.0
                item = decode_result(msg.data)
                if isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
                    # The end of an earlier attempt is not the end: the job was retried since
                    # (its record, written before this message, is no longer terminal, or is
                    # at a later attempt).
                    record = await self.get(job_id)
                    if item.attempt < record.attempt or not record.terminal:
                        yield seq, item
                        continue
                    yield seq, item
                    return
                yield seq, item
        finally:
            await unsubscribe(sub)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """The job's record once it is terminal; :class:`JobTimeout` after ``timeout`` seconds.

        Listens for final messages on the job's result subject with a plain subscription (no
        JetStream consumer: a gateway waits on thousands of jobs), and reads the record, which
        is the authority, after each one and after every quiet spell (0.5 s, doubling to 5 s),
        so a final message missed during a reconnect costs a few seconds, not the job. The
        final message of an earlier attempt of a retried job does not end the wait.
        """

        async def record_now() -> JobRecord:
            delay = 0.05
            while True:
                try:
                    return await self.get(job_id)
                except NotConnected:
                    raise
                except Unavailable:
                    # After a reconnect the control plane may be a moment behind this client.
                    if delay > 2.0:
                        raise
                    await asyncio.sleep(delay)
                    delay *= 2

        async def until_terminal() -> JobRecord:
            sub = await self.nc.subscribe(self.names.results_subject(job_id))
            try:
                quiet_s = 0.5
                while not (record := await record_now()).terminal:
                    try:
                        async with asyncio.timeout(quiet_s):
                            while True:
                                item = decode_result((await sub.next_msg(timeout=None)).data)
                                if isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
                                    break
                    except TimeoutError:
                        quiet_s = min(quiet_s * 2, _STREAM_IDLE_CHECK_S)
                return record
            finally:
                try:
                    await sub.unsubscribe()
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    pass

        try:
            async with asyncio.timeout(timeout) as deadline:
                return await until_terminal()
        except TimeoutError as e:
            if deadline.expired():
                raise JobTimeout(f"job {job_id} did not finish within {timeout}s") from e
            raise

    # ------------------------------------------------------------------ workers, models

    async def workers(self, runtime: str | None = None) -> builtins.list[WorkerRecord]:
        body = ListWorkers(runtime=runtime)  # type: ignore[arg-type]
        return (await self._call(WORKERS_LIST, body)).workers

    async def models(self, runtime: str | None = None) -> builtins.list[ModelRecord]:
        body = ListModels(runtime=runtime)  # type: ignore[arg-type]
        return (await self._call(MODELS_LIST, body)).models

    async def model(self, name: str) -> ModelRecord:
        return await self._call(MODELS_GET, GetModel(name=name))

    # ------------------------------------------------------------------ pools (the operator's)

    async def pools(self) -> builtins.list[PoolView]:
        """Every autoscaler pool with its status."""
        return (await self._call(POOLS_LIST, ListPools())).pools

    async def pool(self, name: str) -> PoolView:
        """One pool: settings, status, the latest scaling decisions (``pool_not_found``)."""
        return await self._call(POOLS_GET, GetPool(name=name))

    async def set_pool(self, spec: PoolSpec) -> PoolView:
        """Create or replace a pool; the autoscaler follows within a tick."""
        return await self._call(POOLS_SET, SetPool(pool=spec))

    async def delete_pool(self, name: str) -> PoolView:
        """Remove a pool; the autoscaler drains its workers. The pool as it was."""
        return await self._call(POOLS_DELETE, RemovePool(name=name))

    # ------------------------------------------------------------------ tenants

    async def tenant_quotas(self) -> builtins.list[TenantView]:
        """Every tenant's quota and use (a tenant's client: its own)."""
        return (await self._call(TENANTS_LIST, ListTenants())).tenants

    async def tenant_quota(self, tenant: str) -> TenantView:
        """One tenant's quota and use now (``tenant_not_found`` when it has none)."""
        return await self._call(TENANTS_GET, GetTenant(tenant=tenant))

    async def set_tenant_quota(self, quota: TenantQuota) -> TenantView:
        """Set a tenant's quota (the operator's); every control plane applies it at once."""
        return await self._call(TENANTS_SET, SetTenant(quota=quota))

    async def delete_tenant_quota(self, tenant: str) -> TenantView:
        """Remove a tenant's quota; the quota as it was."""
        return await self._call(TENANTS_DELETE, RemoveTenant(tenant=tenant))


    # ------------------------------------------------------------------ apps

    async def apps(self) -> builtins.list[AppRecord]:
        """Every deployed app with its live version."""
        return (await self._call(APPS_LIST, ListApps())).apps

    async def app(self, name: str) -> AppRecord:
        """A deployed app: its live version and what it defines (``app_not_found``)."""
        return await self._call(APPS_GET, GetApp(name=name))

    async def deploy_app(self, body: DeployApp) -> AppDeployed:
        """Make a registered app version live (``mnemos deploy`` pushes it first)."""
        return await self._call(APPS_DEPLOY, body)

    # ------------------------------------------------------------------ actors

    async def call_actor(self, app: str, cls: str, key: str, method: str, args: builtins.list[Any],
                         kwargs: dict[str, Any], *, timeout: float = 60.0) -> Any:
        """Call ``method`` of the actor ``cls`` of ``app`` with ``key``: a core request
        straight to the process that hosts its activation (no JetStream). Nothing answers
        on its subject: ask a worker to activate it (from its last checkpoint), then call;
        while no worker takes actors (none runs yet), keep asking. :class:`JobTimeout` when
        no answer came within ``timeout``; the method's own error is raised as its
        :mod:`mnemos.errors` class."""
        nc = self.nc
        subject = self.names.actor_subject(Names.actor_token(app, cls, key))
        payload = encode(ActorCall(method=method, args=args, kwargs=kwargs))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.002
        activations = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(f"actor {cls}({key!r}) of app {app} did not answer within {timeout:g}s")
            try:
                msg = await self._actor_request(nc, subject, payload, remaining)
            except nats.errors.NoRespondersError:
                if activations:  # an activation in progress (here or elsewhere): not so fast
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.25)
                activations += 1
                if not await self._activate_actor(app, cls, key, max(deadline - loop.time(), 0.001)):
                    await asyncio.sleep(pause)  # no worker takes actors yet (one is starting)
                    pause = min(pause * 2, 0.25)
                continue
            except nats.errors.TimeoutError as e:
                raise JobTimeout(f"actor {cls}({key!r}) of app {app} did not answer within {timeout:g}s") from e
            reply = decode(msg.data, ActorReply)
            if reply.retry:  # it is being deactivated: a moment, then wherever it is next
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            if reply.error is not None:
                raise from_info(reply.error)
            return reply.result

    @staticmethod
    async def _actor_request(nc: NATS, subject: str, payload: bytes, timeout: float) -> Any:
        """The reply to one call. Unanswered after a second, the holder is pinged (it
        answers pings between calls) until the reply comes: when nobody is subscribed any
        more (it died with the call), NoResponders, and the caller activates it elsewhere.
        The fast path costs a timer, not a task."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        gone = False
        prober: asyncio.Task[None] | None = None

        async def probe() -> None:
            nonlocal gone
            while True:
                try:
                    await nc.request(subject, b"", timeout=_ACTOR_PROBE_S, headers={HDR_PING: "1"})
                except nats.errors.NoRespondersError:
                    gone = True
                    me.cancel()
                    return
                except nats.errors.TimeoutError:
                    continue  # busy with this call (or the ones before it): still there
                await asyncio.sleep(_ACTOR_PROBE_S)

        def start_probe() -> None:
            nonlocal prober
            prober = loop.create_task(probe())

        timer = loop.call_later(_ACTOR_PROBE_S, start_probe)
        try:
            return await nc.request(subject, payload, timeout=timeout)
        except asyncio.CancelledError:
            if gone and me.uncancel() == 0:
                raise nats.errors.NoRespondersError from None
            raise
        finally:
            timer.cancel()
            if prober is not None:
                prober.cancel()

    async def _activate_actor(self, app: str, cls: str, key: str, timeout: float) -> ActorActivation | None:
        """Have a worker activate the actor; None when no worker takes actors right now."""
        subject = self.names.actor_activate_subject
        try:
            msg = await self.nc.request(subject, encode(ActivateActor(app=app, cls=cls, key=key)),
                                        timeout=max(timeout, 0.001))
        except nats.errors.NoRespondersError:
            return None
        except nats.errors.TimeoutError as e:
            raise JobTimeout(f"activating actor {cls}({key!r}) of app {app} took over {timeout:g}s") from e
        if msg.headers and HDR_SERVICE_ERROR_CODE in msg.headers:
            error = from_info(decode(msg.data, ErrorReply).error)
            if error.retryable:
                return None  # e.g. it was deactivating: call again
            raise error
        return decode(msg.data, ActorActivation)

    async def actors(self, app: str | None = None) -> builtins.list[ActorView]:
        """The live actor activations (key, host, calls, last call)."""
        return (await self._call(ACTORS_LIST, ListActors(app=app))).actors
