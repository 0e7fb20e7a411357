"""Typed, versioned wire messages.

Each message is declared once here as a msgspec Struct with a ``type`` tag such as
``io.mnemos.v1.job`` (like nats micro's ``io.nats.micro.v1.ping_response``). Decoding is
strict: unknown fields, wrong types and out-of-range values raise
:class:`mnemos.errors.ValidationFailed` naming the offending path.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, UTC
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct, field

from mnemos.errors import ErrorInfo, InvalidJSON, MnemosError, ValidationFailed
from mnemos.names import HDR_SERVICE_ERROR, HDR_SERVICE_ERROR_CODE, RUNTIMES, TENANT_RE

__all__ = [
    "JobStatus",
    "MAX_STOP_CHARS",
    "TERMINAL_STATUSES",
    "ACTIVE_STATUSES",
    "RetryPolicy",
    "GenerationParams",
    "ModelRef",
    "ChatMessage",
    "JobInput",
    "JobSpec",
    "JobOutput",
    "ErrorInfo",
    "Phase",
    "Attempt",
    "Timings",
    "Waiting",
    "WaitReason",
    "JobRecord",
    "Dispatch",
    "encode_dispatch",
    "ResultChunk",
    "ResultFinal",
    "ResultStatus",
    "ResultMessage",
    "decode_result",
    "GPUInfo",
    "SystemResources",
    "WorkerRecord",
    "WorkerCommand",
    "ModelFile",
    "ArtifactLocation",
    "ModelRecord",
    "GetJob",
    "ListJobs",
    "JobList",
    "CancelJob",
    "RetryJob",
    "ListWorkers",
    "WorkerList",
    "ListModels",
    "ModelList",
    "GetModel",
    "ErrorReply",
    "PoolName",
    "PoolSpec",
    "PoolWorker",
    "DesiredPoint",
    "ScalingDecision",
    "PoolStatus",
    "PoolView",
    "PoolList",
    "ListPools",
    "GetPool",
    "SetPool",
    "RemovePool",
    "TenantName",
    "TenantQuota",
    "TenantView",
    "TenantList",
    "ListTenants",
    "GetTenant",
    "SetTenant",
    "RemoveTenant",
    "LeaseRecord",
    "AppName",
    "AppMethod",
    "AppDefinition",
    "AppRecord",
    "DeployApp",
    "AppDeployed",
    "GetApp",
    "ListApps",
    "AppList",
    "ActorKey",
    "ActorCall",
    "ActorReply",
    "ActivateActor",
    "ActorActivation",
    "ActorState",
    "ListActors",
    "ActorView",
    "ActorList",
    "encode",
    "error_envelope",
    "decode",
    "new_job_id",
    "utcnow",
]

JobStatus = Literal[
    "queued",
    "acquired",
    "loading_model",
    "running",
    "streaming",
    "cancelling",
    "retrying",
    "completed",
    "failed",
    "timeout",
    "cancelled",
]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "timeout", "cancelled"})
ACTIVE_STATUSES: frozenset[str] = frozenset({"acquired", "loading_model", "running", "streaming"})

Runtime = Literal["vllm", "transformers", "pytorch", "python"]
assert set(Runtime.__args__) == set(RUNTIMES)  # type: ignore[attr-defined]

JobType = Literal["inference", "batch_inference", "training", "fine_tuning", "evaluation"]

# Families: no dots or colons; versions: no underscores (see names.model_token).
Family = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Version = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*(\.[A-Za-z0-9-]+)*$", max_length=64)]
Priority = Annotated[int, Meta(ge=1, le=10)]
PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]


def utcnow() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_job_id() -> str:
    """A ULID: 26 Crockford base32 chars, sortable by creation time (KV and subject safe)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _Strict(Struct, forbid_unknown_fields=True, omit_defaults=False, kw_only=True):
    """Base for every wire message: unknown fields are errors."""


# ----------------------------------------------------------------------------- job spec


class RetryPolicy(_Strict, tag="io.mnemos.v1.retry_policy", tag_field="type"):
    """How a failed attempt is retried (from the CORTEX seed's RetryPolicy)."""

    strategy: Literal["exponential", "linear", "fixed"] = "exponential"
    max_retries: Annotated[int, Meta(ge=0, le=10)] = 3
    initial_delay_seconds: Annotated[float, Meta(ge=0, le=3600)] = 1.0
    max_delay_seconds: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    backoff_multiplier: Annotated[float, Meta(ge=1.0, le=10.0)] = 2.0
    jitter: bool = True
    #: Error codes that may retry; None means every retryable error.
    retry_on_errors: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=32)] | None = None


#: Longest stop string a job may give (a longer one could never be matched by a bounded
#: generation, and checking it on every token costs the worker).
MAX_STOP_CHARS = 1000
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerationParams(_Strict):
    """Sampling parameters for text runtimes (seed rules: temperature 0-2, max_tokens > 0)."""

    max_tokens: Annotated[int, Meta(gt=0, le=32768)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    stop: Annotated[list[StopString], Meta(max_length=16)] | None = None
    seed: int | None = None


class ModelRef(_Strict):
    """Which model runs the job. ``runtime`` defaults to the model's registered runtime."""

    family: Family
    version: Version
    #: Checked against :data:`mnemos.names.RUNTIMES` by the control plane (code ``unknown_runtime``).
    runtime: Annotated[str, Meta(max_length=32)] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)


class ChatMessage(_Strict):
    """One turn of a chat; text runtimes render a list of them with the model's chat template."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class JobInput(_Strict):
    """What the job runs on.

    Text runtimes read ``prompt`` (or ``messages``, a chat) and ``parameters``; ``python``
    calls the function with ``*args, **kwargs``; ``pytorch`` turns ``args`` into tensors.
    """

    prompt: Annotated[str, Meta(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    parameters: GenerationParams = field(default_factory=GenerationParams)
    context: dict[str, Any] | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


class JobSpec(_Strict, tag="io.mnemos.v1.job_spec", tag_field="type"):
    """A job as submitted (seed JobSpec; ``job_id`` is assigned by the control plane)."""

    model: ModelRef
    input: JobInput = field(default_factory=JobInput)
    job_type: JobType = "inference"
    priority: Priority = 5
    timeout_seconds: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    retry_config: RetryPolicy | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    #: The longest the job may wait in the queue for a worker (from when it was queued:
    #: submitted, or queued again); past it the job ends ``timeout`` (code
    #: ``queue_timeout``) without running. None: it waits as long as it takes.
    queue_timeout_seconds: Annotated[float, Meta(gt=0, le=604800)] | None = None


# ----------------------------------------------------------------------------- job record


class JobOutput(_Strict):
    """A finished job's output (seed JobOutput)."""

    result: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Phase(_Strict):
    name: str
    at: datetime


class Attempt(_Strict):
    """One execution attempt of a job, kept in the record's history."""

    attempt: PositiveInt
    worker_id: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    error: ErrorInfo | None = None
    phases: list[Phase] = field(default_factory=list)
    #: Stream sequence of the dispatch message this attempt ran from (to remove a dead
    #: worker's message at once instead of waiting for its redelivery).
    dispatch_seq: int | None = None


class Timings(_Strict):
    """Where the time of the latest attempt went, in milliseconds."""

    queue_ms: float | None = None
    load_ms: float | None = None
    first_token_ms: float | None = None
    run_ms: float | None = None
    total_ms: float | None = None
    #: The model was already loaded in memory (no load at all).
    cache_hit: bool | None = None
    #: The model's files were already on local disk (no download).
    disk_cache_hit: bool | None = None


WaitReason = Literal["no_worker_for_runtime", "waiting_for_capacity"]



class Waiting(_Strict):
    """Why a queued job has not started."""

    #: ``no_worker_for_runtime``: no live worker serves the job's runtime (none registered,
    #: or all paused/draining); ``waiting_for_capacity``: some do, and their slots are taken.
    reason: WaitReason
    #: How long it has waited so far, and what the control plane saw.
    waited_s: float
    detail: str = ""
    #: The autoscaler pool that serves the job's runtime, if one does (its status says what
    #: the autoscaler is doing about the wait: ``mnemos pools get NAME``).
    pool: str | None = None


class JobRecord(_Strict, tag="io.mnemos.v1.job", tag_field="type"):
    """A job's state: the value stored under ``mnemos_jobs.<job_id>``."""

    job_id: str
    status: JobStatus
    spec: JobSpec
    runtime: Runtime
    created_at: datetime
    updated_at: datetime
    attempt: NonNegInt = 0
    attempts: list[Attempt] = field(default_factory=list)
    #: Which dispatch message is current: bumped whenever the job is queued again by the
    #: control plane (``jobs.retry``, a lost worker). A worker holding an older one drops it.
    dispatch: NonNegInt = 0
    worker_id: str | None = None
    timings: Timings = field(default_factory=Timings)
    output: JobOutput | None = None
    error: ErrorInfo | None = None
    tenant: str | None = None
    #: Inbox of a waiting ``jobs.run`` requester; whoever finishes the job answers it.
    reply_to: str | None = None
    #: Stream sequence of the dispatch message that queued the job (a cancel removes it).
    queued_seq: int | None = None
    #: It ended ``failed`` or ``timeout`` with its retry policy used up (its attempts say how).
    dead_letter: bool = False
    #: Why a queued job waits, as the control plane sees it when it answers (computed on
    #: each read, never stored: it cannot go stale in the bucket).
    waiting: Waiting | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Dispatch(_Strict, tag="io.mnemos.v1.dispatch", tag_field="type"):
    """A work-queue message: the job as queued and the KV revision it was queued at.

    The worker claims the job with a compare-and-set on ``revision``, so it needs no
    read before starting.
    """

    record: JobRecord
    #: The record's KV revision; 0 when it is not written yet (``jobs.run``: the claim creates it).
    revision: NonNegInt


class _DispatchOut(_Strict, tag="io.mnemos.v1.dispatch", tag_field="type"):
    """:class:`Dispatch` with the record embedded pre-encoded (same JSON, one encode less)."""

    record: msgspec.Raw
    revision: int


def encode_dispatch(record: JobRecord, revision: int, record_json: bytes | None = None) -> bytes:
    """The JSON of ``Dispatch(record, revision)``, reusing ``record_json`` when given."""
    return encode(_DispatchOut(record=msgspec.Raw(record_json or encode(record)), revision=revision))


# ----------------------------------------------------------------------------- results


class ResultChunk(_Strict, tag="io.mnemos.v1.result_chunk", tag_field="type"):
    """A piece of streamed output on ``mnemos.results.<job_id>``."""

    job_id: str
    attempt: PositiveInt
    seq: NonNegInt
    text: str = ""
    data: Any = None


class ResultFinal(_Strict, tag="io.mnemos.v1.result_final", tag_field="type"):
    """The last message of an attempt on ``mnemos.results.<job_id>``."""

    job_id: str
    attempt: NonNegInt
    status: JobStatus
    output: JobOutput | None = None
    error: ErrorInfo | None = None

    @classmethod
    def of(cls, record: JobRecord) -> ResultFinal:
        """The final message that announces ``record`` as it is now."""
        return cls(job_id=record.job_id, attempt=record.attempt, status=record.status, output=record.output,
                   error=record.error)


class ResultStatus(_Strict, tag="io.mnemos.v1.result_status", tag_field="type"):
    """A status change of an attempt on ``mnemos.results.<job_id>`` (``loading_model``,
    ``running``), so one ordered replay of the stream tells the whole story of a job."""

    job_id: str
    attempt: PositiveInt
    status: JobStatus
    at: datetime
    worker_id: str | None = None


ResultMessage = ResultChunk | ResultFinal | ResultStatus


def decode_result(data: bytes) -> ResultChunk | ResultFinal | ResultStatus:
    """A message of a result stream (chunk, final or status)."""
    return decode(data, ResultMessage)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- workers


class GPUInfo(_Strict):
    index: NonNegInt
    name: str
    total_memory_mb: int
    available_memory_mb: int
    utilization_percent: float
    uuid: str | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


class SystemResources(_Strict):
    cpu_count: int
    cpu_percent: float
    memory_total_mb: int
    memory_available_mb: int
    disk_total_gb: float
    disk_available_gb: float
    process_rss_mb: float = 0.0
    gpus: list[GPUInfo] = field(default_factory=list)


WorkerStatus = Literal[
    "initializing", "connecting", "registering", "starting", "idle", "busy", "paused", "draining", "stopped", "error"
]


class WorkerRecord(_Strict, tag="io.mnemos.v1.worker", tag_field="type"):
    """A worker as advertised in ``mnemos_workers`` and on its heartbeat subject."""

    worker_id: str
    hostname: str
    version: str
    status: WorkerStatus
    runtimes: list[Runtime]
    max_concurrent_jobs: PositiveInt
    free_slots: NonNegInt
    registered_at: datetime
    last_heartbeat: datetime
    current_jobs: list[str] = field(default_factory=list)
    loaded_models: list[str] = field(default_factory=list)
    resources: SystemResources | None = None
    tags: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_s: float = 5.0
    jobs_completed: NonNegInt = 0
    jobs_failed: NonNegInt = 0
    #: Why the worker is in status ``error`` (None otherwise).
    error: str | None = None
    #: How many models fit in its memory at once (``MNEMOS_WORKER_MAX_LOADED_MODELS``; 0:
    #: not said). Other workers read it to route a model's jobs to who has room for it.
    max_loaded_models: NonNegInt = 0


class WorkerCommand(_Strict, tag="io.mnemos.v1.worker_command", tag_field="type"):
    """Request on ``mnemos.worker.<id>.control``; the reply is the worker's record."""

    #: ``drain_if_idle``: drain only if no job is running or being claimed right now (the
    #: autoscaler's scale-down; a busy worker answers with its record and keeps working).
    command: Literal["status", "drain", "drain_if_idle", "pause", "resume"]


# ----------------------------------------------------------------------------- models


class ModelFile(_Strict):
    path: str
    size: NonNegInt
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class ArtifactLocation(_Strict):
    """Where a model's bytes live: the NATS object store (default) or S3."""

    store: Literal["nats", "s3"]
    bucket: str
    prefix: str


class ModelRecord(_Strict, tag="io.mnemos.v1.model", tag_field="type"):
    """A registered model: the value stored under ``mnemos_models.<family>.<version>``."""

    family: Family
    version: Version
    runtime: Runtime
    artifact: ArtifactLocation
    files: list[ModelFile]
    total_size: NonNegInt
    created_at: datetime
    runtime_config: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}:{self.version}"


# ----------------------------------------------------------------------------- API bodies


class GetJob(_Strict):
    job_id: Annotated[str, Meta(min_length=1, max_length=64)]


class ListJobs(_Strict):
    status: list[JobStatus] | None = None
    model: str | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50
    #: Opaque cursor from a previous page (``next_cursor``).
    cursor: Annotated[str, Meta(max_length=64)] | None = None
    #: Only dead-lettered jobs (ended failed/timeout with no attempts left).
    dead_letter: bool = False


class JobList(_Strict, tag="io.mnemos.v1.job_list", tag_field="type"):
    jobs: list[JobRecord]
    next_cursor: str | None = None


class CancelJob(_Strict):
    job_id: Annotated[str, Meta(min_length=1, max_length=64)]
    reason: str | None = None


class RetryJob(_Strict):
    job_id: Annotated[str, Meta(min_length=1, max_length=64)]


class ListWorkers(_Strict):
    runtime: Runtime | None = None


class WorkerList(_Strict, tag="io.mnemos.v1.worker_list", tag_field="type"):
    workers: list[WorkerRecord]


class ListModels(_Strict):
    runtime: Runtime | None = None


class ModelList(_Strict, tag="io.mnemos.v1.model_list", tag_field="type"):
    models: list[ModelRecord]


class GetModel(_Strict):
    #: ``family:version`` or an alias.
    name: Annotated[str, Meta(min_length=1, max_length=160)]


class ErrorReply(_Strict, tag="io.mnemos.v1.error", tag_field="type"):
    """Body of every error reply (the micro error headers carry the same code)."""

    error: ErrorInfo


# ----------------------------------------------------------------------------- pools

#: A pool's name: a KV key token and a tag value (lower case, digits, ``-``).
PoolName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$")]
ModelName = Annotated[str, Meta(min_length=3, max_length=160)]
ProviderName = Literal["local", "aws"]
SettingValue = str | int | float | bool


class PoolSpec(_Strict, tag="io.mnemos.v1.pool", tag_field="type"):
    """A set of identical workers the autoscaler keeps sized to their work: the value of
    ``mnemos_pools.<name>`` (``nats kv get mnemos_pools NAME``)."""

    name: PoolName
    runtimes: Annotated[list[Runtime], Meta(min_length=1)]
    #: Models (``family:version``) the pool is for; empty: every model of its runtimes.
    #: A job counts toward the most specific pool: one that names its model, else one
    #: that serves its runtime.
    models: Annotated[list[ModelName], Meta(max_length=256)] = field(default_factory=list)
    provider: ProviderName = "local"
    #: Provider settings (``aws``: ``region``, ``endpoint_url``; ``local``: ``env``-like
    #: ``MNEMOS_WORKER_*`` overrides are not accepted here, see docs/autoscaling.md).
    provider_settings: Annotated[dict[Annotated[str, Meta(pattern=r"^[a-z_]{1,64}$")], SettingValue],
                                 Meta(max_length=32)] = field(default_factory=dict)
    min_workers: NonNegInt = 0
    max_workers: Annotated[int, Meta(ge=0, le=10_000)] = 4
    #: Jobs per worker the pool aims at (None: each worker's declared ``max_concurrent_jobs``;
    #: never more than that).
    target_concurrency: PositiveInt | None = None
    #: Concurrent jobs a worker of the pool runs (what a new local worker is started with,
    #: and the capacity assumed for a worker not yet registered).
    worker_slots: Annotated[int, Meta(ge=1, le=4096)] = 4
    #: Idle spares kept warm while the pool has work (Modal's ``buffer_containers``).
    buffer_workers: Annotated[int, Meta(ge=0, le=10_000)] = 0
    #: Scale down only after this long of surplus, to the most the window needed.
    scaledown_window_s: Annotated[float, Meta(ge=0, le=86_400)] = 60.0
    #: A started worker that has not registered after this long is stopped and replaced.
    start_timeout_s: Annotated[float, Meta(gt=0, le=7200)] = 180.0
    description: Annotated[str, Meta(max_length=1024)] = ""


class PoolWorker(_Strict):
    """One worker of a pool as the autoscaler tracks it."""

    worker_id: str
    #: ``starting``: asked of the provider, not registered yet; ``ready``: registered
    #: (idle or busy); ``draining``: told to drain (it finishes its jobs, deregisters and
    #: is then stopped by the provider).
    state: Literal["starting", "ready", "draining"]
    since: datetime
    #: When the provider was asked for it.
    started_at: datetime | None = None
    #: Seconds the provider's ``start`` call took (a local fork; an API call for a cloud).
    provider_start_s: float | None = None
    #: Seconds from asking the provider to the worker's registration.
    provisioning_s: float | None = None
    busy: bool = False
    detail: str = ""


class ScalingDecision(_Strict):
    """One thing the autoscaler did, and why."""

    at: datetime
    #: ``scale_up``, ``scale_down``, ``at_max``, ``drain``, ``release``, ``remove``, ``replace``,
    #: ``silent`` (a worker stopped heartbeating), ``error``.
    action: str
    #: What it saw (demand, workers, per-worker capacity) and the rule that applied.
    reason: str
    #: What it asked the provider for.
    asked: str = ""
    #: What came of it.
    outcome: str = ""
    #: How many times the same decision was made again (one entry for an error repeated
    #: each round, not one per round); ``at`` is then the latest.
    repeated: NonNegInt = 0


class DesiredPoint(_Strict):
    """From ``at`` on, the pool's work needed ``desired`` workers (until the next point)."""

    at: datetime
    desired: NonNegInt


class PoolStatus(_Strict, tag="io.mnemos.v1.pool_status", tag_field="type"):
    """What the acting autoscaler last saw and did for one pool
    (``nats kv get mnemos_autoscaler status.NAME``)."""

    pool: PoolName
    updated_at: datetime
    autoscaler: str
    #: The settings it acted on (a new leader drains a pool removed meanwhile with them).
    spec: PoolSpec | None = None
    desired: NonNegInt = 0
    starting: NonNegInt = 0
    ready: NonNegInt = 0
    busy: NonNegInt = 0
    draining: NonNegInt = 0
    #: Dispatch messages held for the pool (queued or running) by priority, and in all.
    messages_by_priority: dict[str, int] = field(default_factory=dict)
    messages: NonNegInt = 0
    running: NonNegInt = 0
    per_worker: PositiveInt = 1
    #: The pool is at ``max_workers`` with work waiting (visible, never silent).
    at_max: bool = False
    #: What the work needs now (``desired`` stays above it while the scale-down window
    #: still remembers more).
    need: NonNegInt = 0
    #: Since when an autoscaler has watched the pool without a gap, and the need's change
    #: points over the last scale-down window: a new leader goes on with the same window.
    watching_since: datetime | None = None
    need_history: list[DesiredPoint] = field(default_factory=list)
    workers: list[PoolWorker] = field(default_factory=list)
    #: The latest decisions, newest last.
    decisions: list[ScalingDecision] = field(default_factory=list)


class PoolView(_Strict, tag="io.mnemos.v1.pool_view", tag_field="type"):
    """A pool's settings with its status (None until an autoscaler has acted on it)."""

    spec: PoolSpec
    status: PoolStatus | None = None
    revision: NonNegInt = 0


class PoolList(_Strict, tag="io.mnemos.v1.pool_list", tag_field="type"):
    pools: list[PoolView]


class ListPools(_Strict):
    pass


class GetPool(_Strict):
    name: PoolName


class SetPool(_Strict):
    pool: PoolSpec


class RemovePool(_Strict):
    name: PoolName


#: A tenant's name as quotas key it (a KV key and a subject token).
TenantName = Annotated[str, Meta(pattern=TENANT_RE.pattern)]


class TenantQuota(_Strict, tag="io.mnemos.v1.tenant_quota", tag_field="type"):
    """What one tenant may have and do (``<ns>_tenants.<tenant>``); None: no bound."""

    tenant: TenantName
    #: Jobs waiting in the queue at once.
    max_queued: NonNegInt | None = None
    #: Jobs claimed and not ended at once (a submission beyond it is refused; queued jobs
    #: are not held back).
    max_running: NonNegInt | None = None
    #: Submissions per second (a token bucket per control plane) ...
    submit_rate: Annotated[float, Meta(gt=0, le=1e6)] | None = None
    #: ... of this many tokens (default: the rate rounded up, at least 1).
    submit_burst: PositiveInt | None = None
    #: When it was set (written by the control plane).
    updated_at: datetime | None = None


class TenantView(_Strict, tag="io.mnemos.v1.tenant_view", tag_field="type"):
    """A tenant's quota with its use now, as the control plane's job index counts it."""

    quota: TenantQuota
    queued: NonNegInt = 0
    running: NonNegInt = 0


class TenantList(_Strict, tag="io.mnemos.v1.tenant_list", tag_field="type"):
    tenants: list[TenantView]


class ListTenants(_Strict):
    pass


class GetTenant(_Strict):
    tenant: TenantName


class SetTenant(_Strict):
    quota: TenantQuota


class RemoveTenant(_Strict):
    tenant: TenantName


class LeaseRecord(_Strict, tag="io.mnemos.v1.lease", tag_field="type"):
    """The autoscaler's leadership (``mnemos_autoscaler.leader``); it expires with the
    key's TTL unless its holder renews it."""

    holder: str
    acquired_at: datetime
    renewed_at: datetime
    ttl_s: float


# ----------------------------------------------------------------------------- apps

AppName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]
#: A Python identifier (a function, class or method name of an app).
Identifier = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class AppMethod(_Strict):
    """One method of an app class: how it is called."""

    name: Identifier
    #: ``call``: returns a value; ``stream``: a generator (its items stream); ``batched``:
    #: called with lists of up to ``max_batch_size`` inputs gathered within ``wait_ms``.
    kind: Literal["call", "stream", "batched"] = "call"
    max_batch_size: Annotated[int, Meta(ge=1, le=1024)] = 8
    wait_ms: Annotated[float, Meta(ge=0, le=60_000)] = 10.0


class AppDefinition(_Strict):
    """A function or class of an app with the settings it was declared with."""

    name: Identifier
    kind: Literal["function", "class", "actor"]
    #: A function's own kind (``call`` or ``stream``); a class's methods.
    function_kind: Literal["call", "stream"] = "call"
    methods: Annotated[list[AppMethod], Meta(max_length=256)] = field(default_factory=list)
    #: Seconds a call may run (the job's ``timeout_seconds``).
    timeout: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    #: Retries of a failed call (the job's ``retry_config.max_retries``).
    retries: Annotated[int, Meta(ge=0, le=10)] = 0
    #: Calls one worker runs at once (a batched method's batch is one call's worth per input).
    max_concurrency: Annotated[int, Meta(ge=1, le=1024)] = 1
    min_workers: Annotated[int, Meta(ge=0, le=10_000)] = 0
    max_workers: Annotated[int, Meta(ge=0, le=10_000)] = 4
    scaledown_window: Annotated[float, Meta(ge=0, le=86_400)] = 60.0
    priority: Priority = 5
    #: The worker stack the code needs (its libraries must import on the worker).
    runtime: Runtime = "python"
    #: ``any`` or a GPU model name (``H100``): the worker must have one.
    gpu: Annotated[str, Meta(max_length=64)] | None = None
    description: Annotated[str, Meta(max_length=1024)] = ""
    #: An actor is deactivated (its state checkpointed, its activation removed) after
    #: this long without a call.
    idle_timeout: Annotated[float, Meta(gt=0, le=7 * 86_400)] = 300.0
    #: An actor's state is checkpointed after each call (None), or at most this often.
    checkpoint_interval: Annotated[float, Meta(gt=0, le=86_400)] | None = None

    @property
    def targets(self) -> list[str]:
        """The names jobs call: ``add``, or ``Generator.generate`` for each method (an
        actor's methods are called on its activation, not as jobs)."""
        if self.kind == "function":
            return [self.name]
        if self.kind == "actor":
            return []
        return [f"{self.name}.{m.name}" for m in self.methods]


class AppRecord(_Strict, tag="io.mnemos.v1.app", tag_field="type"):
    """A deployed app: the value of ``mnemos_apps.<name>``. Calls go to ``version``, the
    registry model ``<name>:<version>`` (a content hash of the app's source)."""

    name: AppName
    version: Version
    definitions: Annotated[list[AppDefinition], Meta(max_length=256)]
    deployed_at: datetime
    #: The version this one replaced (its calls in flight finish on it).
    previous_version: Version | None = None
    #: The autoscaler pool the app's calls count for.
    pool: PoolName | None = None
    requirements: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return f"{self.name}:{self.version}"

    def definition(self, name: str) -> AppDefinition | None:
        return next((d for d in self.definitions if d.name == name), None)


class DeployApp(_Strict):
    """Make ``version`` (already in the registry) the app's live version."""

    name: AppName
    version: Version
    definitions: Annotated[list[AppDefinition], Meta(min_length=1, max_length=256)]
    requirements: list[str] = field(default_factory=list)


class AppDeployed(_Strict, tag="io.mnemos.v1.app_deployed", tag_field="type"):
    app: AppRecord
    #: False: the same version was already live (nothing changed).
    changed: bool
    revision: NonNegInt = 0


class GetApp(_Strict):
    name: AppName


class ListApps(_Strict):
    pass


class AppList(_Strict, tag="io.mnemos.v1.app_list", tag_field="type"):
    apps: list[AppRecord]


# ----------------------------------------------------------------------------- actors

ActorKey = Annotated[str, Meta(min_length=1, max_length=256)]


class ActorCall(_Strict):
    """One call of an actor's method (core request/reply to its activation's subject)."""

    method: Identifier
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


class ActorReply(_Strict):
    result: Any = None
    error: ErrorInfo | None = None
    #: The activation is being deactivated: call again (it answers from its next home).
    retry: bool = False


class ActivateActor(_Strict):
    """Ask the workers (one of them, by queue group) to activate an actor unless it is."""

    app: AppName
    cls: Identifier
    key: ActorKey


class ActorActivation(_Strict, tag="io.mnemos.v1.actor_activation", tag_field="type"):
    """The one live activation of an actor: ``mnemos_actors.act.<token>``, claimed with a
    create (compare-and-set), taken over only from a holder that no longer answers."""

    app: AppName
    cls: Identifier
    key: ActorKey
    version: Version
    worker_id: str
    subject: str
    activated_at: datetime
    pid: int | None = None


class ActorState(_Strict, tag="io.mnemos.v1.actor_state", tag_field="type"):
    """An actor's last checkpoint: ``mnemos_actors.state.<token>``."""

    app: AppName
    cls: Identifier
    key: ActorKey
    state: Any
    saved_at: datetime
    calls: NonNegInt = 0
    last_call_at: datetime | None = None


class ListActors(_Strict):
    app: AppName | None = None


class ActorView(_Strict):
    """A live activation, with what its last checkpoint says."""

    activation: ActorActivation
    calls: NonNegInt = 0
    last_call_at: datetime | None = None


class ActorList(_Strict, tag="io.mnemos.v1.actor_list", tag_field="type"):
    actors: list[ActorView]


# ----------------------------------------------------------------------------- codec

_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def error_envelope(error: MnemosError) -> tuple[bytes, dict[str, str]]:
    """The one error envelope as a NATS reply: an ``ErrorReply`` body and the micro
    service's error headers (what ``Client`` turns back into the error class)."""
    return encode(ErrorReply(error=error.info())), {HDR_SERVICE_ERROR: error.message,
                                                     HDR_SERVICE_ERROR_CODE: str(error.status)}


def encode(msg: Any) -> bytes:
    """Encode a message (or any JSON-able value) to JSON bytes."""
    return _encoder.encode(msg)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(data: bytes | str, type: type[T]) -> T:  # noqa: A002 - mirrors msgspec's own name
    """Decode ``data`` strictly as ``type``; raise :class:`mnemos.errors.ValidationFailed`."""
    dec = _decoders.get(type)
    if dec is None:
        dec = _decoders[type] = msgspec.json.Decoder(type)
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as e:
        raise ValidationFailed(str(e)) from e
    except msgspec.DecodeError as e:
        raise InvalidJSON(f"malformed JSON: {e}") from e
    except RecursionError as e:
        raise InvalidJSON("JSON nested too deeply") from e
    except UnicodeDecodeError as e:
        raise InvalidJSON(f"a JSON string is not valid UTF-8: {e}") from e
