"""Jobs whose worker cannot be trusted to end them: dead workers, deadlines, unconfirmed cancels.

Liveness comes from heartbeats. Every worker publishes its record on
``mnemos.heartbeat.<id>`` (and into ``mnemos_workers``, where it expires after three missed
beats); the reaper notes when it last heard each one, on its own clock. A worker silent for
two of its heartbeat intervals is dead: every job it holds, according to the job index
(so also the jobs it claimed after its last heartbeat), gets its attempt recorded as
``lost`` and, within the job's retry policy, is queued again with a new dispatch generation
(the dead worker's message is deleted); past its retries it ends ``failed`` (``timeout`` if
it had outlived ``timeout_seconds``), and a ``cancelling`` job ends ``cancelled``. A record
that expires, and a held job whose worker this process has never heard of (it died while
no control plane was watching), lead to the same recovery. A worker that stops cleanly
deletes its record and is left alone.

Every half second the reaper also ends what a live worker fails to end: an attempt past its
``timeout_seconds`` plus ``timeout_grace_s`` (a frozen worker, a run that ignores its
cancellation) times out, and a ``cancelling`` job whose worker has not confirmed within
``cancel_confirm_s`` is ``cancelled`` (its cancel signal is sent again meanwhile).

Every write is a compare-and-set through :mod:`mnemos.lifecycle`, so several control planes
reacting to the same event change each job once.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from control_plane.index import IndexEntry, JobIndex
from mnemos.connection import patiently
from mnemos.errors import JobNotFound, MnemosError, ValidationFailed
from mnemos.jobstore import JobStore
from mnemos.lifecycle import confirm_cancel, expire_attempt, expire_in_queue, lose_attempt
from mnemos.messages import JobRecord, WorkerRecord, decode, utcnow
from mnemos.names import Names
from mnemos.tasks import Supervisor, next_round

__all__ = ["Reaper", "ReaperTimings", "JobActions"]

log = logging.getLogger("mnemos.control_plane.reaper")

#: How often liveness is checked (cheap: one pass over the workers) ...
_TICK_S = 0.1
#: ... and how often the held jobs are checked for deadlines, cancels and orphans.
_SWEEP_S = 0.5
#: How long a deregistered worker's late heartbeats are ignored.
_FORGET_LEFT_S = 60.0


@dataclass(frozen=True)
class ReaperTimings:
    #: A worker silent for this many of its heartbeat intervals is dead.
    dead_after_beats: float = 2.0
    #: An attempt is timed out by the control plane this long after its ``timeout_seconds``.
    timeout_grace_s: float = 5.0
    #: A ``cancelling`` job is ended ``cancelled`` after this long without its worker's word.
    cancel_confirm_s: float = 10.0
    #: The cancel signal of a ``cancelling`` job is sent again this often.
    cancel_resend_s: float = 2.0
    #: A held job whose worker this process has not heard of for this long is recovered.
    orphan_after_s: float = 15.0
    #: A job queued this long ago and still unclaimed has its dispatch message checked: one
    #: that is missing (a control plane died between writing the record and the message)
    #: is sent again. Checked again every ``requeue_recheck_s`` while it waits.
    requeue_check_s: float = 10.0
    requeue_recheck_s: float = 60.0
    #: At most this many waiting jobs are checked per sweep (each check is one read).
    requeue_checks_per_sweep: int = 64


@dataclass(frozen=True)
class JobActions:
    """What the reaper asks of the control plane after it changed a job."""

    #: Queue ``record`` again (at KV revision): (stream sequence, whether a message was stored
    #: now rather than found there within the stream's duplicate window). Raises
    #: MnemosError when it cannot.
    requeue: Callable[[JobRecord, int], Awaitable[tuple[int, bool]]]
    #: Queue ``record`` with a new message even if one of its generation was sent before
    #: (that one is gone); its stream sequence.
    redispatch: Callable[[JobRecord, int], Awaitable[int]]
    #: Whether the dispatch message at a stream sequence is there and queues
    #: (job id, generation).
    message_exists: Callable[[int, str, int], Awaitable[bool]]
    #: The final message on the result stream, and the answer to a waiting ``jobs.run``.
    announce: Callable[[JobRecord], Awaitable[None]]
    #: Delete a dispatch message by stream sequence.
    drop_message: Callable[[int], Awaitable[None]]
    #: Tell whichever worker runs the job to stop it.
    signal_cancel: Callable[[str, str], Awaitable[None]]


class Reaper:
    """Watches worker liveness and job deadlines; ends the jobs no live worker will end."""

    def __init__(
        self,
        nc: NATS,
        names: Names,
        workers: KeyValue,
        jobs: JobStore,
        index: JobIndex,
        actions: JobActions,
        timings: ReaperTimings,
        supervisor: Supervisor,
    ) -> None:
        self.nc = nc
        self.names = names
        self.workers = workers
        self.jobs = jobs
        self.index = index
        self.actions = actions
        self.timings = timings
        self.supervisor = supervisor
        #: Workers believed alive, with their latest record.
        self.live: dict[str, WorkerRecord] = {}
        self.recovered = 0
        self.timed_out = 0
        self.cancels_confirmed = 0
        self.repaired = 0
        #: Waiting jobs checked: job id -> (generation, monotonic time of the check, the
        #: stream sequence of its message if known).
        self._checked: dict[str, tuple[int, float, int | None]] = {}
        #: Waiting jobs' next dispatch check and queue deadline, soonest first: (monotonic
        #: time, job id, dispatch generation). Entries of jobs that left the queue (or were
        #: queued again, under a new generation) are dropped when they come up.
        self._checks: list[tuple[float, str, int]] = []
        self._deadlines: list[tuple[float, str, int]] = []
        self.queue_timeouts = 0
        self._heard: dict[str, float] = {}  # worker id -> monotonic time of its last sign of life
        #: Workers that deregistered (id -> their registration time): a heartbeat that was
        #: sent before the deletion but arrives after it must not bring them back.
        self._left: dict[str, tuple[datetime, float]] = {}
        self._orphans: dict[str, float] = {}  # job id -> monotonic time first seen without a live worker
        self._resent: dict[str, float] = {}  # job id -> monotonic time its cancel was last sent
        self._busy: set[str] = set()  # jobs being settled right now
        self._settling: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._started_at = 0.0
        self._last_tick = 0.0
        self._reconnects = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._sub is not None:
            return
        self._started_at = self._last_tick = time.monotonic()
        self._reconnects = self.nc.stats["reconnects"]
        self._sub = await self.nc.subscribe(self.names.heartbeat_all, cb=self._on_heartbeat)
        watcher = await patiently(self.workers.watchall, "watch the workers bucket")
        self.supervisor.spawn("reaper-workers", self._follow(watcher))
        self.supervisor.spawn("reaper-sweep", self._sweep_loop())

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - the connection may be closing
                log.debug("heartbeat unsubscribe: %r", e)
        await self.supervisor.stop("reaper-sweep")
        await self.supervisor.stop("reaper-workers")
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=10.0)

    # ------------------------------------------------------------------ liveness

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            record = decode(msg.data, WorkerRecord)
        except ValidationFailed as e:
            log.warning("ignoring a malformed heartbeat on %s: %s", msg.subject, e)
            return
        left = self._left.get(record.worker_id)
        if record.status == "stopped" or (left is not None and left[0] == record.registered_at):
            return
        self.live[record.worker_id] = record
        self._heard[record.worker_id] = time.monotonic()

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation is None and entry.value:
                    try:
                        record = decode(entry.value, WorkerRecord)
                    except ValidationFailed as e:
                        log.warning("ignoring malformed worker record %s: %s", entry.key, e)
                        continue
                    self.live[entry.key] = record
                    self._heard[entry.key] = time.monotonic()
                    self._left.pop(entry.key, None)
                    continue
                if entry.operation == "PURGE":  # expired: three heartbeats missed
                    if entry.key in self._heard:
                        self._declare_dead(entry.key, "its record expired")
                else:  # deleted by the worker itself: it stopped cleanly
                    last = self.live.pop(entry.key, None)
                    self._heard.pop(entry.key, None)
                    if last is not None:
                        self._left[entry.key] = (last.registered_at, time.monotonic())
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _declare_dead(self, worker_id: str, why: str) -> None:
        self.live.pop(worker_id, None)
        self._heard.pop(worker_id, None)
        held = self.index.held_by(worker_id)
        log.warning("worker %s is dead (%s); recovering %d job(s)", worker_id, why, len(held))
        for entry in held:
            self._spawn_recovery(entry.job_id, worker_id)

    def _spawn_recovery(self, job_id: str, worker_id: str) -> None:
        self._spawn_settle(job_id, f"lost with worker {worker_id}",
                           lambda rec: lose_attempt(rec, worker_id, utcnow()), stop_worker=False)

    # ------------------------------------------------------------------ the sweep

    async def _sweep_loop(self) -> None:
        await self.index.ready.wait()
        ticks_per_sweep = round(_SWEEP_S / _TICK_S)
        tick = 0
        while True:
            await next_round(_TICK_S)
            tick += 1
            self.sweep(held=tick % ticks_per_sweep == 0)

    def sweep(self, held: bool = True) -> None:
        """One round: dead workers; with ``held``, also orphaned jobs, deadlines and
        unconfirmed cancels."""
        now = time.monotonic()
        stalled = now - self._last_tick > 2.0
        reconnects = self.nc.stats["reconnects"]
        if stalled or reconnects != self._reconnects or not self.nc.is_connected:
            # This process, not the workers, was away (a stalled loop, a reconnect): what it
            # did not hear proves nothing. Start counting again.
            self._reconnects = reconnects
            self._heard = dict.fromkeys(self._heard, now)
            self._orphans.clear()
            self._started_at = now
        self._last_tick = now
        t = self.timings
        for worker_id, heard in list(self._heard.items()):
            record = self.live.get(worker_id)
            interval = record.heartbeat_interval_s if record is not None else 5.0
            if now - heard > t.dead_after_beats * interval:
                self._declare_dead(worker_id, f"no heartbeat for {now - heard:.1f}s")
        if not held:
            return
        for entry in list(self.index.held()):
            if entry.job_id in self._busy:
                continue
            self._check_held(entry, now)
        self._check_waiting(now)
        for job_id in [j for j in self._orphans if j not in self.index.entries or not self.index.entries[j].held]:
            del self._orphans[job_id]
        for worker_id in [w for w, (_, at) in self._left.items() if now - at > _FORGET_LEFT_S]:
            del self._left[worker_id]

    def _check_held(self, entry: IndexEntry, now: float) -> None:
        t = self.timings
        worker_id = entry.worker_id
        if worker_id is not None and worker_id not in self._heard:
            first = self._orphans.setdefault(entry.job_id, now)
            if now - first > t.orphan_after_s and now - self._started_at > t.orphan_after_s:
                del self._orphans[entry.job_id]
                log.warning("job %s is held by worker %s, which this control plane never heard from",
                            entry.job_id, worker_id)
                self._spawn_recovery(entry.job_id, worker_id)
            return
        self._orphans.pop(entry.job_id, None)
        attempt = entry.attempt
        if entry.status == "cancelling" and entry.cancelling_since is not None:
            waited = now - entry.cancelling_since
            if waited > t.cancel_confirm_s:
                self._spawn_settle(entry.job_id, f"cancel not confirmed by {worker_id} within {t.cancel_confirm_s:g}s",
                                   lambda rec: confirm_cancel(rec, attempt, utcnow()), stop_worker=True)
            elif now - self._resent.get(entry.job_id, entry.cancelling_since) > t.cancel_resend_s:
                self._resent[entry.job_id] = now
                self._spawn(self.actions.signal_cancel(entry.job_id, "cancel requested (sent again)"))
            return
        if entry.held_since is not None and now - entry.held_since > entry.timeout_s + t.timeout_grace_s:
            self._spawn_settle(entry.job_id, f"past its timeout on {worker_id}",
                               lambda rec: expire_attempt(rec, attempt, utcnow()), stop_worker=True)

    def _check_waiting(self, now: float) -> None:
        """Queue deadlines, and the dispatch messages of jobs that wait long. The work of a
        pass is what falls due in it (at most ``requeue_checks_per_sweep`` checks), not the
        length of the queue."""
        t = self.timings
        for new in self.index.take_new_waiting():
            since = new.queued_since if new.queued_since is not None else now
            heapq.heappush(self._checks, (since + t.requeue_check_s, new.job_id, new.dispatch))
            if new.queue_timeout_s is not None:
                heapq.heappush(self._deadlines, (since + new.queue_timeout_s, new.job_id, new.dispatch))
        while self._deadlines and self._deadlines[0][0] < now:
            _, job_id, generation = heapq.heappop(self._deadlines)
            waiting = self.index.waiting_entry(job_id)
            if waiting is None or waiting.dispatch != generation:
                continue  # claimed, ended, or queued again (with a deadline of its own)
            if job_id in self._busy:
                heapq.heappush(self._deadlines, (now + 0.5, job_id, generation))
                continue
            waited = now - (waiting.queued_since if waiting.queued_since is not None else now)
            self.queue_timeouts += 1
            self._spawn_settle(job_id, f"waited {waited:.1f}s in the queue",
                               lambda rec, g=generation, w=waited: expire_in_queue(rec, g, w),  # type: ignore[misc]
                               stop_worker=False)
        checks = 0
        while self._checks and self._checks[0][0] < now and checks < t.requeue_checks_per_sweep:
            _, job_id, generation = heapq.heappop(self._checks)
            waiting = self.index.waiting_entry(job_id)
            if waiting is None or waiting.dispatch != generation:
                continue
            checked = self._checked.get(job_id)
            if job_id in self._busy or (checked is not None and checked[0] == generation
                                        and now - checked[1] < t.requeue_recheck_s):
                again = now + 0.5 if job_id in self._busy else checked[1] + t.requeue_recheck_s  # type: ignore[index]
                heapq.heappush(self._checks, (again, job_id, generation))
                continue
            checks += 1
            seq = checked[2] if checked is not None and checked[0] == generation else waiting.queued_seq
            self._checked[job_id] = (generation, now, seq)
            heapq.heappush(self._checks, (now + t.requeue_recheck_s, job_id, generation))
            self._spawn(self._ensure_dispatched(job_id, generation, seq))
        if len(self._checked) > 2 * self.index.waiting_count + 1000:
            self._checked = {j: c for j, c in self._checked.items() if self.index.waiting_entry(j) is not None}

    async def _ensure_dispatched(self, job_id: str, generation: int, seq: int | None) -> None:
        """A job queued a while ago is still unclaimed: make sure its dispatch message exists.

        Where the message's sequence is unknown (a later generation, after a restart) it is
        sent again under its own message id: the stream drops that as a duplicate while it
        remembers the first (the usual case), and the ack names the first one's sequence.
        A message that is not there is replaced by a new one.
        """
        record, revision = await self.jobs.get(job_id, fresh=True)
        if record.status != "queued" or record.dispatch != generation:
            return
        if seq is None:
            seq, stored = await self.actions.requeue(record, revision)
            self._checked[job_id] = (generation, time.monotonic(), seq)
            if stored:
                self._repaired(job_id, "a control plane stopped between writing the record and the message")
                return
        if await self.actions.message_exists(seq, job_id, generation):
            return
        record, revision = await self.jobs.get(job_id, fresh=True)  # claimed (and done) meanwhile?
        if record.status != "queued" or record.dispatch != generation:
            return
        seq = await self.actions.redispatch(record, revision)
        self._checked[job_id] = (generation, time.monotonic(), seq)
        self._repaired(job_id, f"its message (sequence {seq}) was gone")

    def _repaired(self, job_id: str, why: str) -> None:
        self.repaired += 1
        log.warning("job %s waited without a dispatch message (%s); queued it again", job_id, why)

    # ------------------------------------------------------------------ settling one job

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except MnemosError as e:
                log.warning("reaper action failed: %r", e)
            except Exception:  # a one-shot action: logged, and the next sweep tries again
                log.exception("reaper action failed")

        task = asyncio.create_task(run())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _spawn_settle(self, job_id: str, why: str, change: Callable[[JobRecord], bool], *, stop_worker: bool) -> None:
        if job_id in self._busy:
            return
        self._busy.add(job_id)

        async def run() -> None:
            try:
                await self.settle(job_id, why, change, stop_worker=stop_worker)
            except MnemosError as e:
                log.error("could not settle job %s (%s): %r", job_id, why, e)
            except Exception:
                log.exception("could not settle job %s (%s)", job_id, why)
            finally:
                self._busy.discard(job_id)
                self._resent.pop(job_id, None)

        task = asyncio.create_task(run(), name=f"settle-{job_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def settle(
        self, job_id: str, why: str, change: Callable[[JobRecord], bool], *, stop_worker: bool
    ) -> JobRecord | None:
        """Apply ``change`` (a :mod:`mnemos.lifecycle` transition) to the job; then delete the
        ended attempt's dispatch message and queue the job again or announce its end. None
        if the transition no longer applied (the job moved on meanwhile)."""
        changed = False

        def apply(rec: JobRecord) -> JobRecord | None:
            nonlocal changed
            changed = change(rec)
            return rec if changed else None

        try:
            record, revision = await self.jobs.mutate(job_id, apply)
        except JobNotFound:
            self.index.forget(job_id)
            return None
        if not changed:
            return None
        ended = record.attempts[-1] if record.attempts else None
        if record.error is not None and record.error.code == "queue_timeout":
            if record.dispatch == 0 and record.queued_seq is not None:
                await self.actions.drop_message(record.queued_seq)  # never to be pulled
        elif ended is not None and ended.outcome == "timeout":
            self.timed_out += 1
        elif record.status == "cancelled":
            self.cancels_confirmed += 1
        else:
            self.recovered += 1
        if ended is not None and ended.dispatch_seq is not None:
            await self.actions.drop_message(ended.dispatch_seq)  # stale now; else it lingers until its ack wait
        if stop_worker:
            await self.actions.signal_cancel(job_id, why)
        if record.status == "queued":
            log.info("job %s requeued (attempt %d %s)", job_id, record.attempt, why)
            delay = 0.1
            while True:  # the record says queued: its message must get out
                try:
                    seq, _ = await self.actions.requeue(record, revision)
                    self._checked[job_id] = (record.dispatch, time.monotonic(), seq)
                    break
                except MnemosError as e:
                    log.warning("requeueing job %s failed (%r); retrying", job_id, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        elif record.terminal:
            log.info("job %s %s (%s)", job_id, record.status, why)
            await self.actions.announce(record)
        return record

    async def recover_job(self, job_id: str, worker_id: str) -> JobRecord | None:
        """Record the lost attempt of ``job_id`` on ``worker_id`` and queue or end the job."""
        return await self.settle(job_id, f"lost with worker {worker_id}",
                                 lambda rec: lose_attempt(rec, worker_id, utcnow()), stop_worker=False)
