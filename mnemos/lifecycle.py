"""Job transitions, as pure functions over a :class:`~mnemos.messages.JobRecord`.

Whoever changes a job's state (the control plane, its reaper, a worker) applies one of
these inside a compare-and-set (:meth:`mnemos.jobstore.JobStore.mutate`), so each rule is
written once. Each returns whether it changed the record; a transition that does not apply
to the record as it is now (already terminal, another attempt, another worker) changes
nothing, which is how a lost race becomes a no-op.

Invariants (``DESIGN.md`` section 3): a terminal record never changes; attempts never
decrease; a ``cancelling`` job ends ``cancelled``, never ``completed``.
"""

from __future__ import annotations

from datetime import datetime

from mnemos.errors import JobCancelled, JobTimeout, MnemosError, WorkerLost
from mnemos.messages import ACTIVE_STATUSES, ErrorInfo, JobRecord, Phase
from mnemos.retry import failures, policy_for, should_retry

__all__ = ["HELD_STATUSES", "lose_attempt", "expire_attempt", "confirm_cancel", "final_status"]

#: Statuses in which a worker holds the job (its current attempt has not ended).
HELD_STATUSES: frozenset[str] = ACTIVE_STATUSES | {"cancelling"}


def final_status(current: str, outcome: str) -> str:
    """What an attempt that ended with ``outcome`` makes of a job that is ``current`` now:
    a job whose cancellation was requested ends ``cancelled``, whatever its run did (the
    compare-and-set order decides what came first: had the finish been recorded before the
    cancel, the cancel would have found the job finished)."""
    return "cancelled" if current == "cancelling" else outcome


def _end_attempt(rec: JobRecord, now: datetime, outcome: str, error: MnemosError) -> None:
    """Close the current attempt, then cancel, requeue (a new dispatch generation) or end
    the job, following its retry policy."""
    attempt = rec.attempts[-1]
    attempt.ended_at = now
    attempt.outcome = outcome
    attempt.error = error.info()
    attempt.phases.append(Phase(name=outcome, at=now))
    if rec.status == "cancelling":
        rec.status = "cancelled"
        if rec.error is None:
            rec.error = JobCancelled("cancelled by request").info()
    elif should_retry(policy_for(rec.spec), failures(rec), error.info()):
        rec.status = "queued"
        rec.dispatch += 1
        rec.worker_id = None
    else:
        rec.status = "timeout" if outcome == "timeout" else "failed"
        rec.error = error.info()


def _held_by(rec: JobRecord, worker_id: str | None, attempt: int | None) -> bool:
    if rec.status not in HELD_STATUSES or not rec.attempts or rec.attempts[-1].ended_at is not None:
        return False
    if worker_id is not None and rec.worker_id != worker_id:
        return False
    return attempt is None or rec.attempt == attempt


def lose_attempt(rec: JobRecord, worker_id: str, now: datetime) -> bool:
    """``worker_id`` died holding the job: its attempt is ``lost`` (or ``timeout`` if it had
    already outlived ``timeout_seconds``)."""
    if not _held_by(rec, worker_id, None):
        return False
    started = rec.attempts[-1].started_at
    if (now - started).total_seconds() > rec.spec.timeout_seconds:
        _end_attempt(rec, now, "timeout", JobTimeout(f"worker {worker_id} vanished after the job's timeout"))
    else:
        _end_attempt(rec, now, "lost", WorkerLost(f"worker {worker_id} stopped heartbeating"))
    return True


def expire_attempt(rec: JobRecord, attempt: int, now: datetime) -> bool:
    """Attempt ``attempt`` ran past its job's ``timeout_seconds`` and its worker did not end
    it (frozen, or unable to stop it): the control plane ends it as a timeout."""
    if not _held_by(rec, None, attempt):
        return False
    _end_attempt(rec, now, "timeout", JobTimeout(
        f"job exceeded its timeout of {rec.spec.timeout_seconds:g}s and its worker {rec.worker_id} did not end it"))
    return True


def confirm_cancel(rec: JobRecord, attempt: int, now: datetime) -> bool:
    """A ``cancelling`` job whose worker did not confirm in time is ``cancelled`` by the
    control plane; whatever the worker records later is dropped."""
    if rec.status != "cancelling" or not _held_by(rec, None, attempt):
        return False
    a = rec.attempts[-1]
    a.ended_at = now
    a.outcome = "cancelled"
    a.error = rec.error or ErrorInfo(code="cancelled", message="cancelled by request")
    a.phases.append(Phase(name="cancelled", at=now))
    rec.status = "cancelled"
    return True
