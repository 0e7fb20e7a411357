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
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import api as jsapi

from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.errors import JobTimeout, NotConnected, Unavailable, ValidationFailed, from_info
from mnemos.messages import (
    TERMINAL_STATUSES,
    CancelJob,
    ErrorReply,
    GetJob,
    GetModel,
    JobList,
    JobRecord,
    JobSpec,
    ListJobs,
    ListModels,
    ListWorkers,
    ModelList,
    ModelRecord,
    ResultChunk,
    ResultFinal,
    ResultMessage,
    RetryJob,
    WorkerList,
    WorkerRecord,
    decode,
    encode,
)
from mnemos.names import HDR_SERVICE_ERROR_CODE, Names

__all__ = ["Client", "job_spec"]

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
    **parameters: Any,
) -> JobSpec:
    """Build a :class:`JobSpec` from ``"family:version"`` and keyword arguments.

    Extra keywords are generation parameters (``max_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``stop``, ``seed``). ``function`` picks a function of a python model.
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
    }
    return decode(encode(raw), JobSpec)


class Client:
    """Async client of one MNEMOS namespace."""

    def __init__(self, nc: NATS | None, names: Names | None = None, *, request_timeout: float = 10.0) -> None:
        self._nc = nc
        self._owned = False
        self.names = names or Names()
        self.request_timeout = request_timeout

    @classmethod
    async def connect(cls, settings: NatsSettings | None = None, *, request_timeout: float = 10.0) -> "Client":
        """Connect to NATS as described by ``settings`` (default: ``MNEMOS_*`` environment)."""
        settings = settings or NatsSettings()
        client = cls(await connect(settings, "mnemos-client"), settings.names, request_timeout=request_timeout)
        client._owned = True
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

    async def _call(self, endpoint: str, body: Any, timeout: float | None = None) -> bytes:
        payload = body if isinstance(body, bytes) else encode(body)
        try:
            msg = await self.nc.request(
                self.names.api_subject(endpoint), payload, timeout=timeout or self.request_timeout
            )
        except nats.errors.NoRespondersError as e:
            raise Unavailable(f"no control plane answers on {self.names.api_subject(endpoint)}") from e
        except nats.errors.TimeoutError as e:
            raise Unavailable(f"{endpoint} got no answer within {timeout or self.request_timeout}s") from e
        if msg.headers and HDR_SERVICE_ERROR_CODE in msg.headers:
            raise from_info(decode(msg.data, ErrorReply).error)
        return msg.data

    # ------------------------------------------------------------------ jobs

    async def submit(self, spec: JobSpec) -> JobRecord:
        """Queue a job; returns its record (status ``queued``)."""
        return decode(await self._call("jobs.submit", spec), JobRecord)

    async def run(self, spec: JobSpec, timeout: float | None = None) -> JobRecord:
        """Submit and wait for the finished record (the worker answers directly)."""
        wait = timeout if timeout is not None else spec.timeout_seconds + 60.0
        try:
            return decode(await self._call("jobs.run", spec, timeout=wait), JobRecord)
        except Unavailable as e:
            if isinstance(e.__cause__, nats.errors.TimeoutError):
                raise JobTimeout(f"job did not finish within {wait:g}s") from e
            raise

    async def get(self, job_id: str) -> JobRecord:
        return decode(await self._call("jobs.get", GetJob(job_id=job_id)), JobRecord)

    async def list(
        self,
        *,
        status: builtins.list[str] | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobList:
        body = ListJobs(status=status, model=model, limit=limit, cursor=cursor)  # type: ignore[arg-type]
        return decode(await self._call("jobs.list", body, timeout=max(self.request_timeout, 30.0)), JobList)

    async def cancel(self, job_id: str, reason: str | None = None) -> JobRecord:
        return decode(await self._call("jobs.cancel", CancelJob(job_id=job_id, reason=reason)), JobRecord)

    async def retry(self, job_id: str) -> JobRecord:
        return decode(await self._call("jobs.retry", RetryJob(job_id=job_id)), JobRecord)

    async def stream(self, job_id: str, *, start_seq: int | None = None) -> AsyncIterator[ResultMessage]:
        """Chunks and final messages of a job as they are stored, from the start (or a
        stream sequence), until a final message with a terminal status.

        An ordered consumer: after a reconnect it resumes where it stopped, in order.
        """
        js = self.nc.jetstream()
        config: dict[str, Any] = {}
        if start_seq is not None:
            config = {"deliver_policy": jsapi.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
        sub = await js.subscribe(
            self.names.results_subject(job_id),
            ordered_consumer=True,
            config=jsapi.ConsumerConfig(**config) if config else None,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_STREAM_IDLE_CHECK_S)
                except nats.errors.TimeoutError:
                    # Quiet for a while: the record is the authority (a result stream can
                    # expire, and a worker can die between recording and announcing).
                    record = await self.get(job_id)
                    if record.terminal:
                        yield ResultFinal(job_id=job_id, attempt=record.attempt, status=record.status,
                                          output=record.output, error=record.error)
                        return
                    continue
                item: ResultChunk | ResultFinal = decode(msg.data, ResultMessage)  # type: ignore[arg-type]
                if isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
                    # The end of an earlier attempt (the job was retried since) is not the end.
                    if item.attempt < (await self.get(job_id)).attempt:
                        yield item
                        continue
                    yield item
                    return
                yield item
        finally:
            await sub.unsubscribe()

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """The job's record once it is terminal."""
        record = await self.get(job_id)
        if record.terminal:
            return record

        async def until_final() -> None:
            async for item in self.stream(job_id):
                if isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
                    return

        try:
            await asyncio.wait_for(until_final(), timeout)
        except TimeoutError as e:
            raise JobTimeout(f"job {job_id} did not finish within {timeout}s") from e
        return await self.get(job_id)

    # ------------------------------------------------------------------ workers, models

    async def workers(self, runtime: str | None = None) -> builtins.list[WorkerRecord]:
        body = ListWorkers(runtime=runtime)  # type: ignore[arg-type]
        return decode(await self._call("workers.list", body), WorkerList).workers

    async def models(self, runtime: str | None = None) -> builtins.list[ModelRecord]:
        body = ListModels(runtime=runtime)  # type: ignore[arg-type]
        return decode(await self._call("models.list", body), ModelList).models

    async def model(self, name: str) -> ModelRecord:
        return decode(await self._call("models.get", GetModel(name=name)), ModelRecord)

