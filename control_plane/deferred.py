"""Deferred job records for ``jobs.run``.

A ``jobs.run`` caller learns the job id only from the final reply, so nobody can ask for
the record while the job is young. The control plane therefore queues such a job with one
JetStream write (the dispatch message, durable before anything else) and lets the worker's
claim create the record (a compare-and-set on revision 0). Only if no worker has claimed
the job within ``delay_s`` does the control plane write the ``queued`` record itself, so a
job that waits is visible in ``jobs.list`` and cancellable. Either write may come first;
the other loses its compare-and-set and changes nothing.

"Claimed" is read from the dispatch consumer, not from the record: a consumer delivers in
stream order, so a job whose dispatch sequence is at or below the consumer's last
delivered sequence is in a worker's hands (which writes the record when it claims). One
``CONSUMER.INFO`` per consumer and batch of due jobs replaces a write per job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from mnemos.connection import unavailable_from
from mnemos.errors import Conflict, MnemosError
from mnemos.jobstore import JobStore
from mnemos.messages import JobRecord
from mnemos.tasks import Supervisor, next_round

__all__ = ["DeferredRecords"]

log = logging.getLogger("mnemos.control_plane")

_ROUND_S = 0.25
_TASK = "deferred-records"


@dataclass(frozen=True, slots=True)
class _Due:
    at: float
    record: JobRecord
    consumer: str
    seq: int


class DeferredRecords:
    """Writes ``queued`` records for run-jobs that no worker claimed within ``delay_s``."""

    def __init__(self, jobs: JobStore, js: JetStreamContext, stream: str, delay_s: float) -> None:
        self.jobs = jobs
        self.js = js
        self.stream = stream
        self.delay_s = delay_s
        self._due: collections.deque[_Due] = collections.deque()
        self._wake = asyncio.Event()
        self._supervisor: Supervisor | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Run the loop as ``supervisor``'s task ``deferred-records``: if it dies, queued
        run-jobs would stay invisible, so its death is the control plane's fatal error."""
        if self._supervisor is None:
            self._supervisor = supervisor
            supervisor.spawn(_TASK, self._loop())

    def add(self, record: JobRecord, consumer: str, seq: int) -> None:
        """Track a run-job dispatched as stream sequence ``seq`` for ``consumer``."""
        self._due.append(_Due(time.monotonic() + self.delay_s, record, consumer, seq))
        self._wake.set()

    async def stop(self) -> None:
        """Write every pending record now (bounded), then stop."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.stop(_TASK)
        pending = [self._write(d.record) for d in self._due]
        self._due.clear()
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), timeout=10.0)

    async def _loop(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._due[0].at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            now = time.monotonic()
            batch: list[_Due] = []
            while self._due and self._due[0].at <= now:
                batch.append(self._due.popleft())
            delivered: dict[str, int] = {}
            for consumer in {d.consumer for d in batch}:
                delivered[consumer] = await self._delivered(consumer)
            for d in batch:
                if d.seq > delivered[d.consumer]:
                    await self._write(d.record)
            # One round of CONSUMER.INFO per consumer at most every _ROUND_S, however many
            # jobs arrive (due jobs wait up to that much longer).
            await next_round(_ROUND_S)

    async def _delivered(self, consumer: str) -> int:
        """The consumer's last delivered stream sequence (0 if unknown: then write)."""
        try:
            info = await self.js.consumer_info(self.stream, consumer)
        except NotFoundError:  # no worker has pulled this model yet: nothing delivered
            return 0
        except Exception as e:  # nats-py raises several types; writing is the safe answer
            log.warning("consumer info for %s failed (%r); writing queued records", consumer, e)
            return 0
        return info.delivered.stream_seq if info.delivered and info.delivered.stream_seq else 0

    async def _write(self, record: JobRecord) -> None:
        try:
            await self.jobs.create(record)
            log.debug("job %s still queued after %.1fs: record written", record.job_id, self.delay_s)
        except Conflict:
            pass  # a worker claimed it first: its record is the one
        except Exception as e:
            # NATS cannot take it now: the worker's claim still creates the record. Anything
            # else is a bug, and ends the loop loudly.
            if not isinstance(e, MnemosError) and unavailable_from(e) is None:
                raise
            log.warning("could not write the queued record of %s: %r", record.job_id, e)
