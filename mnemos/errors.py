"""MNEMOS errors and the one envelope they travel in.

Every failure has a stable string ``code`` (what scripts and the HTTP gateway switch on),
a message, and ``retryable``. On the wire an error is a micro error reply: headers
``Nats-Service-Error`` / ``Nats-Service-Error-Code`` (a numeric status) plus an
:class:`~mnemos.messages.ErrorReply` JSON body holding an :class:`ErrorInfo`, the envelope,
which is declared here (and re-exported by :mod:`mnemos.messages`) so that errors need no
message module. :func:`from_info` turns an envelope back into the matching exception class.

``status`` is the one table from error to status, used as the micro error code and as the
HTTP status by the gateway: 400 malformed JSON or request header, 401 no/unknown API key,
403 a job that tries to choose the code it runs, 404 not found (job, model, function),
409 wrong state, 413 too large, 415 a body that is not JSON, 422 validation, 429
backpressure, 503 unavailable or shed (both with ``Retry-After``), 504 timed out, 500 a
job's own failure or a bug.
"""

from __future__ import annotations

from typing import Any, ClassVar

from msgspec import Struct

__all__ = [
    "ErrorInfo",
    "MnemosError",
    "InvalidJSON",
    "InvalidRequest",
    "UnsupportedMediaType",
    "ValidationFailed",
    "OverrideRefused",
    "UnknownFunction",
    "PayloadTooLarge",
    "UnknownModel",
    "UnknownRuntime",
    "Unauthorized",
    "JobNotFound",
    "ModelNotFound",
    "PoolNotFound",
    "AppNotFound",
    "Forbidden",
    "InvalidState",
    "NotCancellable",
    "Conflict",
    "QueueFull",
    "QuotaExceeded",
    "TenantNotFound",
    "Unavailable",
    "NotConnected",
    "JobTimeout",
    "QueueTimeout",
    "JobCancelled",
    "ExecutionError",
    "ModelLoadError",
    "ArtifactError",
    "WorkerLost",
    "Internal",
    "ERROR_CLASSES",
    "from_info",
]


# Strict like every wire message of mnemos.messages (the same Struct options as its base).
class ErrorInfo(Struct, forbid_unknown_fields=True, omit_defaults=False, kw_only=True):
    """The one error envelope: a stable code, a message, and whether retrying may help."""

    code: str
    message: str
    retryable: bool = False
    details: dict[str, Any] | None = None


class MnemosError(Exception):
    """Base of every MNEMOS error. ``code`` is stable; ``status`` is the micro/HTTP-like code."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    retryable_default: ClassVar[bool] = False

    def __init__(
        self, message: str = "", *, retryable: bool | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.retryable = self.retryable_default if retryable is None else retryable
        self.details = details

    def info(self) -> ErrorInfo:
        """This error as an :class:`ErrorInfo` envelope."""
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable, details=self.details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidJSON(MnemosError, ValueError):
    code = "invalid_json"
    status = 400


class InvalidRequest(MnemosError, ValueError):
    """A request header or parameter that cannot be read at all (e.g. an out-of-range
    ``Last-Event-ID``)."""

    code = "invalid_request"
    status = 400


class UnsupportedMediaType(MnemosError, ValueError):
    """A request body sent as something other than ``application/json``."""

    code = "unsupported_media_type"
    status = 415


class ValidationFailed(MnemosError, ValueError):
    code = "validation_error"
    status = 422


class OverrideRefused(MnemosError, PermissionError):
    """A job tried to set what only the model's registration sets (its ``entrypoint``, load
    settings...): what code runs is never the job's choice."""

    code = "override_refused"
    status = 403


class UnknownFunction(MnemosError, LookupError):
    """A job named a function its python model does not declare."""

    code = "unknown_function"
    status = 404


class PayloadTooLarge(MnemosError, ValueError):
    code = "payload_too_large"
    status = 413


class UnknownModel(MnemosError, LookupError):
    code = "unknown_model"
    status = 404


class UnknownRuntime(MnemosError, ValueError):
    code = "unknown_runtime"
    status = 422


class Unauthorized(MnemosError, PermissionError):
    """No API key, or one the gateway does not know."""

    code = "unauthorized"
    status = 401


class Forbidden(MnemosError, PermissionError):
    """The caller is known but may not do this (a tenant managing the operator's pools)."""

    code = "forbidden"
    status = 403


class JobNotFound(MnemosError, LookupError):
    code = "job_not_found"
    status = 404


class ModelNotFound(MnemosError, LookupError):
    code = "model_not_found"
    status = 404


class PoolNotFound(MnemosError, LookupError):
    code = "pool_not_found"
    status = 404


class AppNotFound(MnemosError, LookupError):
    """No app of that name is deployed."""

    code = "app_not_found"
    status = 404


class InvalidState(MnemosError):
    """The job is in a state where the request makes no sense (e.g. retrying a running job)."""

    code = "invalid_state"
    status = 409


class NotCancellable(InvalidState):
    code = "not_cancellable"
    status = 409


class Conflict(MnemosError):
    code = "conflict"
    status = 409
    retryable_default = True


class QueueFull(MnemosError):
    code = "queue_full"
    status = 429
    retryable_default = True


class QuotaExceeded(MnemosError):
    """A tenant's quota (``tenants.set``) refuses the submission now: queued or running
    jobs at their bound, or submissions faster than its rate (``details.retry_after_s``)."""

    code = "quota_exceeded"
    status = 429
    retryable_default = True


class TenantNotFound(MnemosError, LookupError):
    code = "tenant_not_found"
    status = 404


class Unavailable(MnemosError, ConnectionError):
    code = "unavailable"
    status = 503
    retryable_default = True


class NotConnected(Unavailable):
    code = "not_connected"
    status = 503
    retryable_default = False


class JobTimeout(MnemosError, TimeoutError):
    code = "timeout"
    status = 504
    retryable_default = True


class QueueTimeout(JobTimeout):
    """A job waited in the queue longer than its ``queue_timeout_seconds``."""

    code = "queue_timeout"
    status = 504
    retryable_default = False


class JobCancelled(MnemosError):
    code = "cancelled"
    status = 409


class ExecutionError(MnemosError, RuntimeError):
    """The job's own code or model raised."""

    code = "execution_error"
    status = 500


class ModelLoadError(MnemosError, RuntimeError):
    code = "model_load_error"
    status = 500
    retryable_default = True


class ArtifactError(MnemosError, OSError):
    code = "artifact_error"
    status = 500
    retryable_default = True


class WorkerLost(MnemosError):
    code = "worker_lost"
    status = 503
    retryable_default = True


class Internal(MnemosError):
    code = "internal"
    status = 500


ERROR_CLASSES: dict[str, type[MnemosError]] = {
    cls.code: cls
    for cls in (
        InvalidJSON,
        InvalidRequest,
        UnsupportedMediaType,
        ValidationFailed,
        OverrideRefused,
        UnknownFunction,
        PayloadTooLarge,
        UnknownModel,
        UnknownRuntime,
        Unauthorized,
        Forbidden,
        JobNotFound,
        ModelNotFound,
        PoolNotFound,
        AppNotFound,
        InvalidState,
        NotCancellable,
        Conflict,
        QueueFull,
        QuotaExceeded,
        TenantNotFound,
        Unavailable,
        NotConnected,
        JobTimeout,
        JobCancelled,
        ExecutionError,
        ModelLoadError,
        ArtifactError,
        WorkerLost,
        Internal,
    )
}


def from_info(info: ErrorInfo) -> MnemosError:
    """The exception for an :class:`ErrorInfo` (unknown codes -> MnemosError)."""
    cls = ERROR_CLASSES.get(info.code)
    if cls is None:
        err = MnemosError(info.message, retryable=info.retryable, details=info.details)
        err.code = info.code  # type: ignore[misc]
        return err
    return cls(info.message, retryable=info.retryable, details=info.details)
