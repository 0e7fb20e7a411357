"""Retry decisions shared by workers and the control plane (the CORTEX seed's RetryHandler)."""

from __future__ import annotations

import random

from mnemos.messages import ErrorInfo, JobRecord, JobSpec, RetryPolicy

__all__ = ["DEFAULT_RETRY_POLICY", "FAILED_OUTCOMES", "failures", "policy_for", "should_retry", "retry_delay"]

#: Attempt outcomes that count against a job's retry budget ("handed_back" does not).
FAILED_OUTCOMES = frozenset({"failed", "timeout", "lost"})

#: Used when a job names no ``retry_config``: retryable errors get two more tries.
DEFAULT_RETRY_POLICY = RetryPolicy(
    strategy="exponential", max_retries=2, initial_delay_seconds=1.0, max_delay_seconds=60.0
)


def policy_for(spec: JobSpec) -> RetryPolicy:
    return spec.retry_config or DEFAULT_RETRY_POLICY


def failures(record: JobRecord) -> int:
    """How many of the job's attempts failed (timed out, were lost)."""
    return sum(1 for a in record.attempts if a.outcome in FAILED_OUTCOMES)


def should_retry(policy: RetryPolicy, failures: int, error: ErrorInfo) -> bool:
    """Whether a job that has failed ``failures`` times (this one, with ``error``, included)
    gets another attempt.

    Retryable errors retry unless ``retry_on_errors`` names other codes; a code listed in
    ``retry_on_errors`` retries even if it is not retryable by default (e.g.
    ``execution_error`` for a flaky user function).
    """
    if failures > policy.max_retries:
        return False
    if policy.retry_on_errors is None:
        return error.retryable
    return error.code in policy.retry_on_errors


def retry_delay(policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``."""
    base = policy.initial_delay_seconds
    if policy.strategy == "exponential":
        delay = base * policy.backoff_multiplier ** (attempt - 1)
    elif policy.strategy == "linear":
        delay = base * attempt
    else:
        delay = base
    delay = min(delay, policy.max_delay_seconds)
    if policy.jitter:
        delay = random.uniform(delay / 2, delay)
    return delay
