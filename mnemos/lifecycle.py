"""Every job transition, as a pure function over a :class:`~mnemos.messages.JobRecord`.

Whoever changes a job's state (the control plane, its reaper, a worker's executor) applies
one of these inside a compare-and-set (:meth:`mnemos.jobstore.JobStore.mutate`, the
executor's ``_write``), so each rule is written once and nobody writes a status of its own.
A transition that does not apply to the record as it is now (already terminal, another
attempt, another worker, another dispatch generation) changes nothing and says so: that is
how a lost race becomes a no-op.

Invariants (``DESIGN.md`` section 3, checked by ``tests/test_lifecycle_model.py`` over
random interleavings): a terminal record never changes, except that ``jobs.retry`` queues
a failed, timed-out or cancelled job again as a new attempt; attempts are never removed
and their numbers only grow; a ``cancelling`` job ends ``cancelled``, never ``completed``;
at most one attempt of a job is open (running) at a time.
"""

from __future__ import annotations

import enum
from datetime import datetime

from mnemos.errors import (
    InvalidState,
    JobCancelled,
    JobTimeout,
    MnemosError,
    NotCancellable,
    QueueTimeout,
    WorkerLost,
)
from mnemos.messages import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    ErrorInfo,
    JobOutput,
    JobRecord,
    JobSpec,
    Phase,
    Timings,
    new_job_id,
)
from mnemos.retry import failures, policy_for, retry_delay, should_retry

__all__ = [
    "HELD_STATUSES",
    "RETRYABLE_BY_REQUEST",
    "Claim",
    "accept",
    "claim",
    "enter_phase",
    "retry_in",
    "finish",
    "hand_back",
    "lose_attempt",
    "expire_attempt",
    "request_cancel",
    "confirm_cancel",
    "requeue_by_request",
    "expire_in_queue",
    "final_status",
]

#: Statuses in which a worker holds the job (its current attempt has not ended).
HELD_STATUSES: frozenset[str] = ACTIVE_STATUSES | {"cancelling"}
#: What ``jobs.retry`` may queue again.
RETRYABLE_BY_REQUEST: frozenset[str] = frozenset({"failed", "timeout", "cancelled"})


class Claim(enum.Enum):
    """What a worker's claim of a dispatch message came to."""

    #: A new attempt, held by the claiming worker.
    TAKEN = "taken"
    #: The job ended on arrival: its cancel had been requested, or the attempt the message
    #: was redelivered from was its last allowed one (now recorded ``lost``).
    ENDED = "ended"
    #: Not this message's to run: the job was queued again since (another generation), or
    #: another worker runs this generation and this is a duplicate first delivery.
    STALE = "stale"
    #: The job is already terminal.
    FINISHED = "finished"


def final_status(current: str, outcome: str) -> str:
    """What an attempt that ended with ``outcome`` makes of a job that is ``current`` now:
    a job whose cancellation was requested ends ``cancelled``, whatever its run did (the
    compare-and-set order decides what came first: had the finish been recorded before the
    cancel, the cancel would have found the job finished)."""
    return "cancelled" if current == "cancelling" else outcome


# ----------------------------------------------------------------------------- helpers


def _holds(rec: JobRecord, worker_id: str | None, attempt: int | None) -> bool:
    """Whether the job's current attempt is open (and, if given, ``worker_id``'s, number ``attempt``)."""
    if rec.status not in HELD_STATUSES or not rec.attempts or rec.attempts[-1].ended_at is not None:
        return False
    if worker_id is not None and rec.worker_id != worker_id:
        return False
    return attempt is None or rec.attempt == attempt


def _close(rec: JobRecord, now: datetime, outcome: str, error: ErrorInfo | None) -> None:
    attempt = rec.attempts[-1]
    attempt.ended_at = now
    attempt.outcome = outcome
    attempt.error = error
    attempt.phases.append(Phase(name=outcome, at=now))


def _exhausted(rec: JobRecord) -> bool:
    """Its failed attempts (the one just ended included) used up its retry policy."""
    return failures(rec) > policy_for(rec.spec).max_retries


def _end(rec: JobRecord, status: str, error: ErrorInfo | None) -> None:
    """A terminal status; ``failed``/``timeout`` with no attempts left is a dead letter."""
    rec.status = status  # type: ignore[assignment]
    rec.error = error
    rec.dead_letter = status in ("failed", "timeout") and _exhausted(rec)


def _lost_elsewhere(rec: JobRecord, now: datetime, outcome: str, error: MnemosError) -> None:
    """Close the current attempt from outside its worker, then cancel, requeue (a new
    dispatch generation) or end the job, following its retry policy."""
    _close(rec, now, outcome, error.info())
    if rec.status == "cancelling":
        _end(rec, "cancelled", rec.error or JobCancelled("cancelled by request").info())
    elif should_retry(policy_for(rec.spec), failures(rec), error.info()):
        rec.status = "queued"
        rec.dispatch += 1
        rec.worker_id = None
    else:
        _end(rec, "timeout" if outcome == "timeout" else "failed", error.info())


# ----------------------------------------------------------------------------- submit


def accept(spec: JobSpec, runtime: str, now: datetime, *, tenant: str | None, reply_to: str | None) -> JobRecord:
    """A submitted job: ``queued``, no attempt yet."""
    return JobRecord(job_id=new_job_id(), status="queued", spec=spec, runtime=runtime,  # type: ignore[arg-type]
                     created_at=now, updated_at=now, reply_to=reply_to, tenant=tenant)


# ----------------------------------------------------------------------------- worker side


def claim(
    rec: JobRecord,
    worker_id: str,
    now: datetime,
    *,
    generation: int,
    redelivered: bool,
    warm: bool,
    dispatch_seq: int | None,
) -> Claim:
    """A worker takes the job for a new attempt from a dispatch message of ``generation``.

    A redelivered message whose previous attempt is still open means that attempt's worker
    stopped acknowledging it: it is recorded ``lost`` (ending the job if that was its last
    allowed attempt) and this worker takes over.
    """
    if rec.terminal:
        return Claim.FINISHED
    if rec.dispatch != generation:
        return Claim.STALE
    if rec.attempts and rec.attempts[-1].ended_at is None:
        if not redelivered:
            return Claim.STALE
        lost_worker = rec.attempts[-1].worker_id
        error = WorkerLost(f"worker {lost_worker} stopped acknowledging the job")
        _close(rec, now, "lost", error.info())
        if rec.status != "cancelling" and not should_retry(policy_for(rec.spec), failures(rec), error.info()):
            _end(rec, "failed", WorkerLost(
                f"gave up after {len(rec.attempts)} attempts; the last worker stopped acknowledging the job").info())
            return Claim.ENDED
    if rec.status == "cancelling":  # its open attempt was just recorded lost
        _end(rec, "cancelled", rec.error or JobCancelled("cancelled by request").info())
        return Claim.ENDED
    first = "running" if warm else "loading_model"
    queued_at = rec.updated_at
    rec.attempt += 1
    rec.attempts.append(Attempt(
        attempt=rec.attempt, worker_id=worker_id, started_at=now, dispatch_seq=dispatch_seq,
        phases=[Phase(name="acquired", at=now), Phase(name=first, at=now)],
    ))
    rec.status = first  # type: ignore[assignment]
    rec.worker_id = worker_id
    rec.timings = Timings(queue_ms=round((now - queued_at).total_seconds() * 1000.0, 3))
    rec.output = None
    rec.error = None
    rec.dead_letter = False
    return Claim.TAKEN


def enter_phase(rec: JobRecord, worker_id: str, phase: str, now: datetime) -> bool:
    """``running`` after the model loaded, ``streaming`` once output flows."""
    if rec.status not in ACTIVE_STATUSES or rec.worker_id != worker_id:
        return False
    rec.status = phase  # type: ignore[assignment]
    rec.attempts[-1].phases.append(Phase(name=phase, at=now))
    return True


def retry_in(rec: JobRecord, outcome: str, error: ErrorInfo | None) -> float | None:
    """Seconds until the next attempt of a job whose current attempt ended ``outcome``
    with ``error``; None: no retry (the policy, the error, or a success says so)."""
    if outcome not in ("failed", "timeout") or error is None:
        return None
    policy = policy_for(rec.spec)
    failed = 1 + failures(rec)
    return retry_delay(policy, failed) if should_retry(policy, failed, error) else None


def finish(
    rec: JobRecord,
    worker_id: str,
    attempt: int,
    now: datetime,
    *,
    outcome: str,
    output: JobOutput | None,
    error: ErrorInfo | None,
    timings: Timings,
    retry_after: float | None,
) -> str | None:
    """The worker records the end of its attempt: the status now (``retrying`` when
    ``retry_after`` is given and the job may still retry), or None if the record moved on
    (the attempt is no longer this worker's: cancelled and confirmed, requeued, finished)."""
    if not _holds(rec, worker_id, attempt):
        return None
    if rec.status == "cancelling":
        status, err, retry = "cancelled", rec.error or error, False
    else:
        status, err, retry = outcome, error, retry_after is not None
    timings.total_ms = round((now - rec.created_at).total_seconds() * 1000.0, 3)
    rec.output = output
    rec.timings = timings
    _close(rec, now, status, err)
    if retry:
        rec.status = "retrying"
        rec.error = err
    else:
        _end(rec, status, err)
    return rec.status


def hand_back(rec: JobRecord, worker_id: str, attempt: int, now: datetime) -> bool:
    """A draining worker gives the job back to the queue: not a failed attempt."""
    if not _holds(rec, worker_id, attempt):
        return False
    _close(rec, now, "handed_back", None)
    if rec.status == "cancelling":
        _end(rec, "cancelled", rec.error)
    else:
        rec.status = "queued"
    return True


# ----------------------------------------------------------------------------- control plane side


def lose_attempt(rec: JobRecord, worker_id: str, now: datetime) -> bool:
    """``worker_id`` died holding the job: its attempt is ``lost`` (or ``timeout`` if it had
    already outlived ``timeout_seconds``)."""
    if not _holds(rec, worker_id, None):
        return False
    started = rec.attempts[-1].started_at
    if (now - started).total_seconds() > rec.spec.timeout_seconds:
        _lost_elsewhere(rec, now, "timeout", JobTimeout(f"worker {worker_id} vanished after the job's timeout"))
    else:
        _lost_elsewhere(rec, now, "lost", WorkerLost(f"worker {worker_id} stopped heartbeating"))
    return True


def expire_attempt(rec: JobRecord, attempt: int, now: datetime) -> bool:
    """Attempt ``attempt`` ran past its job's ``timeout_seconds`` and its worker did not end
    it (frozen, or unable to stop it): the control plane ends it as a timeout."""
    if not _holds(rec, None, attempt):
        return False
    _lost_elsewhere(rec, now, "timeout", JobTimeout(
        f"job exceeded its timeout of {rec.spec.timeout_seconds:g}s and its worker {rec.worker_id} did not end it"))
    return True


def request_cancel(rec: JobRecord, reason: str) -> bool:
    """``jobs.cancel``: a waiting job (``queued``, ``retrying``) is ``cancelled`` at once, a
    running one ``cancelling`` until its worker (or the control plane) confirms. False: it
    was already cancelling or cancelled. A finished job raises :class:`NotCancellable`."""
    if rec.status in ("cancelling", "cancelled"):
        return False
    if rec.status in TERMINAL_STATUSES:
        raise NotCancellable(f"job {rec.job_id} is already {rec.status}")
    error = ErrorInfo(code="cancelled", message=reason)
    if rec.status in ("queued", "retrying"):
        _end(rec, "cancelled", error)
    else:
        rec.status = "cancelling"
        rec.error = error
    return True


def confirm_cancel(rec: JobRecord, attempt: int, now: datetime) -> bool:
    """A ``cancelling`` job whose worker did not confirm in time is ``cancelled`` by the
    control plane; whatever the worker records later is dropped."""
    if rec.status != "cancelling" or not _holds(rec, None, attempt):
        return False
    error = rec.error or ErrorInfo(code="cancelled", message="cancelled by request")
    _close(rec, now, "cancelled", error)
    _end(rec, "cancelled", error)
    return True


def expire_in_queue(rec: JobRecord, generation: int, waited_s: float) -> bool:
    """The job waited in the queue (generation ``generation``, unclaimed) longer than its
    ``queue_timeout_seconds``: it ends ``timeout`` (code ``queue_timeout``) without running.
    Not a dead letter: no attempt failed."""
    if rec.status != "queued" or rec.dispatch != generation:
        return False
    _end(rec, "timeout", QueueTimeout(
        f"waited {waited_s:.1f}s in the queue, past its queue_timeout_seconds of "
        f"{rec.spec.queue_timeout_seconds:g}s").info())
    rec.dead_letter = False
    return True


def requeue_by_request(rec: JobRecord) -> None:
    """``jobs.retry``: a failed, timed-out or cancelled job is queued again (a new dispatch
    generation; its attempt history is kept); anything else raises :class:`InvalidState`."""
    if rec.status not in RETRYABLE_BY_REQUEST:
        raise InvalidState(f"job {rec.job_id} is {rec.status}; only failed/timeout/cancelled jobs retry")
    rec.status = "queued"
    rec.error = None
    rec.output = None
    rec.reply_to = None
    rec.queued_seq = None  # the first dispatch's; a cancel after a retry needs none
    rec.dead_letter = False
    rec.dispatch += 1
