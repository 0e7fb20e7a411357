"""``/v1/jobs``, ``/v1/models``, ``/v1/workers``: the job API over HTTP.

Each route is one request to the control plane through :class:`mnemos.Client`, acting
for the caller's tenant. ``GET /v1/jobs/{id}/events`` is a Server-Sent Events stream of
the job's result stream (``MNEMOS_RESULTS``): every event's ``id`` is its stream sequence,
so a client that reconnects with ``Last-Event-ID`` gets exactly the events after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from control_plane.gateway.deps import GatewayState, gateway_state, tenant_client
from control_plane.gateway.http import (
    ERROR_RESPONSES,
    MsgspecResponse,
    json_response_doc,
    read_body,
    require_json,
    schema_ref,
    to_builtins,
)
from mnemos.client import Client
from mnemos.errors import InvalidRequest, ValidationFailed
from mnemos.messages import (
    JobStatus,
    Runtime,
    JobList,
    JobRecord,
    JobSpec,
    ModelRecord,
    ResultChunk,
    ResultFinal,
    ResultStatus,
    WorkerList,
    encode,
)

__all__ = ["router", "JOB_SPEC_EXAMPLES"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                            description="The job's id (a ULID)")]

#: Request examples shown in the OpenAPI document (they run against `make up`).
JOB_SPEC_EXAMPLES: dict[str, Any] = {
    "text": {
        "summary": "Generate text with the demo model",
        "value": {"model": {"family": "demo-gpt2", "version": "v1"},
                  "input": {"prompt": "Hello", "parameters": {"max_tokens": 16, "temperature": 0}}},
    },
    "chat": {
        "summary": "A chat, rendered with the model's chat template",
        "value": {"model": {"family": "demo-gpt2", "version": "v1"},
                  "input": {"messages": [{"role": "user", "content": "Hi!"}], "parameters": {"max_tokens": 8}}},
    },
    "function": {
        "summary": "Call a Python function of the demo functions model",
        "value": {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "add"}},
                  "input": {"args": [2, 3]}, "priority": 8, "idempotency_key": "add-2-3"},
    },
}
_RECORD_DOC = json_response_doc(JobRecord, "The job's record")
#: OpenAPI links: the id in a job answer feeds the job's other operations (clients and
#: schemathesis' stateful phase follow them).
_JOB_LINKS = {
    name: {"operationId": op, "parameters": {"job_id": "$response.body#/job_id"}}
    for name, op in [("GetJob", "getJob"), ("CancelJob", "cancelJob"), ("RetryJob", "retryJob")]
}


def _record(record: JobRecord, status_code: int = 200) -> Response:
    return MsgspecResponse(record, status_code=status_code)


# ----------------------------------------------------------------------------- jobs


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit a job",
    description="Queues a job and answers 202 with its record (status `queued`). With `?wait=SECONDS` "
    "the answer waits up to that long: 200 with the finished record if the job ended in time, "
    "otherwise 202 with its latest record.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema_ref(JobSpec), "examples": JOB_SPEC_EXAMPLES}}}},
    responses={202: {**_RECORD_DOC, "description": "Accepted (not finished yet)", "links": _JOB_LINKS},
               200: {**_RECORD_DOC, "description": "Finished within `wait`", "links": _JOB_LINKS}},
    tags=["jobs"],
    operation_id="submitJob",
    dependencies=[Depends(require_json)],
)
async def submit_job(
    request: Request,
    client: Client = Depends(tenant_client),
    state: GatewayState = Depends(gateway_state),
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for the job to finish")] = 0.0,
) -> Response:
    if wait > state.settings.max_wait_s:
        raise ValidationFailed(f"wait is at most {state.settings.max_wait_s:g} seconds")
    spec: JobSpec = await read_body(request, JobSpec)
    if wait <= 0:
        return _record(await client.submit(spec), 202)
    # One request: the control plane answers with the queued record, the worker (or
    # whoever ends the job) answers again with the final one.
    record = await client.start(spec, wait)
    if not record.terminal:  # not ended in time: as it is now
        record = await client.get(record.job_id)
    return _record(record, 200 if record.terminal else 202)


@router.get(
    "/jobs",
    summary="List jobs",
    description="Newest first. Pass `next_cursor` of a page as `cursor` to get the next one.",
    responses={200: json_response_doc(JobList, "A page of jobs")},
    tags=["jobs"],
    operation_id="listJobs",
)
async def list_jobs(
    client: Client = Depends(tenant_client),
    status: Annotated[list[JobStatus] | None, Query(description="Only these statuses (repeatable)")] = None,
    model: Annotated[str | None, Query(max_length=160, description="`family:version` or an alias")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    dead_letter: Annotated[bool, Query(description="Only dead-lettered jobs: ended `failed` or `timeout` with "
                                                   "their retries used up (see each job's `attempts`)")] = False,
) -> Response:
    page = await client.list(status=list(status) if status else None, model=model, limit=limit, cursor=cursor,
                             dead_letter=dead_letter)
    return MsgspecResponse(page)


@router.get("/jobs/{job_id}", summary="Get a job", responses={200: _RECORD_DOC}, tags=["jobs"], operation_id="getJob")
async def get_job(job_id: JobId, client: Client = Depends(tenant_client)) -> Response:
    return _record(await client.get(job_id))


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job",
    description="A queued job is `cancelled` at once; a running one becomes `cancelling` until its "
    "worker confirms (`cancelled`). A finished job answers 409 `not_cancellable`.",
    responses={200: _RECORD_DOC, 409: ERROR_RESPONSES[422] | {"description": "Already finished"}},
    tags=["jobs"],
    operation_id="cancelJob",
)
async def cancel_job(
    job_id: JobId,
    client: Client = Depends(tenant_client),
    reason: Annotated[str | None, Query(max_length=500)] = None,
) -> Response:
    return _record(await client.cancel(job_id, reason))


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    summary="Retry a failed, timed-out or cancelled job",
    responses={202: _RECORD_DOC, 409: ERROR_RESPONSES[422] | {"description": "Not in a retryable state"}},
    tags=["jobs"],
    operation_id="retryJob",
)
async def retry_job(job_id: JobId, client: Client = Depends(tenant_client)) -> Response:
    return _record(await client.retry(job_id), 202)


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    description=(
        "Events: `job` (the record when the stream opens, no id), then from the job's result "
        "stream `status` (a status change), `chunk` (streamed output) and `final` (an attempt's "
        "end). Every stream event has an `id` (its `MNEMOS_RESULTS` sequence): reconnect with "
        "`Last-Event-ID` to get exactly the events after it. The stream ends after the final event "
        "of the job's last attempt."
    ),
    responses={200: {"description": "An event stream", "content": {"text/event-stream": {}}}},
    tags=["jobs"],
    operation_id="jobEvents",
)
async def job_events(
    job_id: JobId,
    client: Client = Depends(tenant_client),
    state: GatewayState = Depends(gateway_state),
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    after = None if last_event_id is None else _event_id(last_event_id)
    record = await client.get(job_id)  # 404 (or another tenant's job) before the stream starts
    events = _job_events(client, record, after, state)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


#: Stream sequences are unsigned 64-bit; the one after an id must be one too.
_MAX_EVENT_ID = 2**64 - 2


def _event_id(value: str) -> int:
    """A ``Last-Event-ID``: an event id this stream sent (a stream sequence), else 400."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > _MAX_EVENT_ID:
        raise InvalidRequest(
            f"Last-Event-ID must be an event id sent by this stream (0-{_MAX_EVENT_ID}), got {value[:40]!r}",
            details={"header": "Last-Event-ID"},
        )
    return int(text)


def _sse(event: str, data: bytes, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


_EVENT_NAMES: dict[type[Any], str] = {ResultChunk: "chunk", ResultFinal: "final", ResultStatus: "status"}


async def _job_events(client: Client, record: JobRecord, after: int | None,
                      state: GatewayState) -> AsyncIterator[bytes]:
    """The SSE body: the record (fresh streams only), then :meth:`Client.events` (which
    survives NATS reconnects and ends with the job), with keep-alive comments while quiet."""
    events = client.events(record.job_id, start_seq=None if after is None else after + 1)
    gauge = state.metrics.streams.labels("events")
    gauge.inc()
    pending: asyncio.Future[tuple[int | None, Any]] | None = None
    try:
        if after is None:
            yield _sse("job", encode(record))
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=state.settings.sse_keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                seq, item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                if pending.done():
                    pending = None
            yield _sse(_EVENT_NAMES[type(item)], encode(item), seq)
    finally:
        gauge.dec()
        if pending is not None:  # the client left mid-wait: stop the read, then the stream
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()


# ----------------------------------------------------------------------------- models, workers

_MODEL_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's model list shape; each entry is a model record plus `id`, `object`, "
    "`created` and `owned_by`.",
    "properties": {
        "object": {"enum": ["list"]},
        "data": {"type": "array", "items": {"allOf": [schema_ref(ModelRecord), {
            "type": "object",
            "properties": {"id": {"type": "string"}, "object": {"enum": ["model"]},
                           "created": {"type": "integer"}, "owned_by": {"type": "string"}},
        }]}},
    },
}


def openai_model(model: ModelRecord) -> dict[str, Any]:
    """A model record in OpenAI's ``model`` shape (the record's own fields kept)."""
    entry: dict[str, Any] = {"id": model.name, "object": "model", "created": int(model.created_at.timestamp()),
                             "owned_by": "mnemos"}
    entry.update({k: v for k, v in to_builtins(model).items() if k != "type"})
    return entry


@router.get("/models", summary="List models (OpenAI shape)",
            responses={200: json_response_doc(_MODEL_LIST_SCHEMA, "Registered models")}, tags=["models"])
async def list_models(
    client: Client = Depends(tenant_client),
    runtime: Annotated[Runtime | None, Query()] = None,
) -> Response:
    models = await client.models(runtime)
    return MsgspecResponse({"object": "list", "data": [openai_model(m) for m in models]})


@router.get("/models/{name}", summary="Get a model by `family:version` or alias",
            responses={200: json_response_doc(ModelRecord, "The model")}, tags=["models"])
async def get_model(name: Annotated[str, Path(min_length=1, max_length=160)],
                    client: Client = Depends(tenant_client)) -> Response:
    return MsgspecResponse(openai_model(await client.model(name)))


@router.get("/workers", summary="List live workers",
            responses={200: json_response_doc(WorkerList, "Workers with a live heartbeat")}, tags=["workers"])
async def list_workers(
    client: Client = Depends(tenant_client),
    runtime: Annotated[Runtime | None, Query()] = None,
) -> Response:
    workers = await client.workers(runtime)
    if client.tenant is not None:  # which jobs run where is not a tenant's business
        for worker in workers:
            worker.current_jobs = []
    return MsgspecResponse(WorkerList(workers=workers))
