"""Recovering the jobs of workers that died.

A worker's record in ``mnemos_workers`` expires three heartbeats after its last one; the
server leaves a marker that this watcher sees. The jobs that worker last reported running
are then recovered at once: the attempt is recorded as ``lost`` and, within the job's
retry policy, the job is queued again with a new dispatch generation (workers drop the
old message when it is redelivered); past its retries the job ends ``failed`` (or
``timeout`` when it had already outlived its ``timeout_seconds``), a ``cancelling`` job
ends ``cancelled``. Every write is a compare-and-set, so several control planes reacting
to the same death change each job once.

Jobs claimed after the worker's last heartbeat are not in its record; JetStream redelivers
their messages when the ack wait runs out and the next worker records the lost attempt.
A worker that stops cleanly deletes its record and is left alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from nats.js.kv import KeyValue

from mnemos.errors import JobTimeout, MnemosError, ValidationFailed, WorkerLost
from mnemos.jobstore import JobStore
from mnemos.messages import ACTIVE_STATUSES, JobRecord, Phase, WorkerRecord, decode, utcnow
from mnemos.retry import failures, policy_for
from mnemos.tasks import cancel_and_wait

__all__ = ["Reaper"]

log = logging.getLogger("mnemos.control_plane.reaper")


class Reaper:
    """Watches worker records; recovers the jobs of the ones that expire."""

    def __init__(
        self,
        workers: KeyValue,
        jobs: JobStore,
        requeue: Callable[[JobRecord, int], Awaitable[object]],
        announce: Callable[[JobRecord], Awaitable[None]],
        drop_message: Callable[[int], Awaitable[None]],
    ) -> None:
        self.workers = workers
        self.drop_message = drop_message
        self.jobs = jobs
        self.requeue = requeue
        self.announce = announce
        self.live: dict[str, WorkerRecord] = {}
        self.recovered = 0
        self._task: asyncio.Task[None] | None = None
        self._recoveries: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._task is None:
            watcher = await self.workers.watchall()
            self._task = asyncio.create_task(self._follow(watcher), name="reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._recoveries:
            await asyncio.wait(set(self._recoveries), timeout=10.0)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation is None and entry.value:
                    try:
                        self.live[entry.key] = decode(entry.value, WorkerRecord)
                    except ValidationFailed as e:
                        log.warning("ignoring malformed worker record %s: %s", entry.key, e)
                    continue
                last = self.live.pop(entry.key, None)
                if entry.operation == "PURGE" and last is not None and last.current_jobs:
                    # Expired (no heartbeat), not deleted by a draining worker.
                    task = asyncio.create_task(self._recover(last))
                    self._recoveries.add(task)
                    task.add_done_callback(self._recoveries.discard)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def _recover(self, worker: WorkerRecord) -> None:
        log.warning("worker %s stopped heartbeating; recovering %d job(s)", worker.worker_id,
                    len(worker.current_jobs))
        for job_id in worker.current_jobs:
            try:
                await self.recover_job(job_id, worker.worker_id)
            except MnemosError as e:
                log.error("could not recover job %s of worker %s: %r", job_id, worker.worker_id, e)

    async def recover_job(self, job_id: str, worker_id: str) -> JobRecord | None:
        """Record the lost attempt of ``job_id`` on ``worker_id`` and queue or end the job."""
        now = utcnow()
        changed = False

        def change(rec: JobRecord) -> JobRecord | None:
            nonlocal changed
            changed = False
            if rec.terminal or rec.worker_id != worker_id or rec.status not in ACTIVE_STATUSES | {"cancelling"}:
                return None
            attempt = rec.attempts[-1]
            outlived = now - attempt.started_at > timedelta(seconds=rec.spec.timeout_seconds)
            err = (JobTimeout(f"worker {worker_id} vanished after the job's timeout")
                   if outlived else WorkerLost(f"worker {worker_id} stopped heartbeating"))
            attempt.ended_at = now
            attempt.outcome = "timeout" if outlived else "lost"
            attempt.error = err.info()
            attempt.phases.append(Phase(name=attempt.outcome, at=now))
            if rec.status == "cancelling":
                rec.status = "cancelled"
            elif failures(rec) > policy_for(rec.spec).max_retries:
                rec.status = "timeout" if outlived else "failed"
                rec.error = err.info()
            else:
                rec.status = "queued"
                rec.dispatch += 1
                rec.worker_id = None
            changed = True
            return rec

        record, revision = await self.jobs.mutate(job_id, change)
        if not changed:
            return None  # finished meanwhile, or another control plane dealt with it
        self.recovered += 1
        seq = record.attempts[-1].dispatch_seq if record.attempts else None
        if seq is not None:
            await self.drop_message(seq)  # stale now; else it lingers until its ack wait
        if record.status == "queued":
            log.info("job %s requeued (attempt %d lost with worker %s)", job_id, record.attempt, worker_id)
            delay = 0.1
            while True:  # the record says queued: its message must get out
                try:
                    await self.requeue(record, revision)
                    break
                except MnemosError as e:
                    log.warning("requeueing job %s failed (%r); retrying", job_id, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        elif record.terminal:
            log.info("job %s %s after losing worker %s", job_id, record.status, worker_id)
            await self.announce(record)
        return record
