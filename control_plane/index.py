"""The control plane's index of job records: listing in bounded work, and who holds what.

Each control-plane process keeps one, fed by a watch of ``mnemos_jobs`` (an ordered
consumer: the latest value of every key first, then every write in order, resumed after
reconnects). It holds a few fields per job, never the records:

- ``jobs.list`` walks sorted job ids (ULIDs, so newest first) of the caller's tenant and
  statuses from the cursor and reads only the records of the page it answers, so its
  work is bounded by the page, not by the bucket;
- the reaper asks which jobs a worker holds (every one, also those claimed after its last
  heartbeat) and which jobs run past their deadline or wait too long for a cancel.

The index is a view: it trails the bucket by the watch's latency, so callers re-read a
record before acting on it (and every write is a compare-and-set anyway).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from nats.js.kv import KeyValue
from sortedcontainers import SortedList

from mnemos.lifecycle import HELD_STATUSES

__all__ = ["JobIndex", "IndexEntry", "DEAD_LETTER"]

log = logging.getLogger("mnemos.control_plane.index")


# Lean views of a job record: msgspec decodes only these fields and skips the rest.
class _AttemptView(msgspec.Struct):
    ended_at: datetime | None = None
    dispatch_seq: int | None = None


class _ModelView(msgspec.Struct):
    family: str
    version: str


class _SpecView(msgspec.Struct):
    model: _ModelView
    timeout_seconds: float = 300.0
    queue_timeout_seconds: float | None = None


class _RecordView(msgspec.Struct, tag="io.mnemos.v1.job", tag_field="type"):
    job_id: str
    status: str
    spec: _SpecView
    runtime: str
    updated_at: datetime
    tenant: str | None = None
    worker_id: str | None = None
    attempt: int = 0
    dispatch: int = 0
    attempts: list[_AttemptView] = []
    queued_seq: int | None = None
    dead_letter: bool = False


_decoder = msgspec.json.Decoder(_RecordView)


@dataclass(slots=True)
class IndexEntry:
    """What the index keeps of one job."""

    job_id: str
    status: str
    tenant: str | None
    model: tuple[str, str]
    worker_id: str | None
    attempt: int
    timeout_s: float
    #: Stream sequence of the dispatch message the current attempt runs from.
    dispatch_seq: int | None
    #: The record's dispatch generation (0: as submitted; more: queued again by a control plane).
    dispatch: int = 0
    runtime: str = ""
    dead_letter: bool = False
    queue_timeout_s: float | None = None
    #: Stream sequence of the message that queued this generation, where the record says
    #: (the first dispatch's; a later generation's is not in the record).
    queued_seq: int | None = None
    #: ``time.monotonic()`` when this process saw the current attempt start / the cancel
    #: requested (its own clock: deadlines never depend on another machine's). A job
    #: already queued when this process first saw it counts from the record's
    #: ``updated_at`` (the writer's clock), so a restart does not reset its queue time.
    held_since: float | None = None
    cancelling_since: float | None = None
    queued_since: float | None = None

    @property
    def held(self) -> bool:
        return self.status in HELD_STATUSES and self.held_since is not None


_ListKey = tuple[str | None, str | None]  # (tenant or None: all, status or None: all)
#: The list of dead-lettered jobs (a pseudo-status of the index: failed/timeout, retries used up).
DEAD_LETTER = "dead_letter"


class JobIndex:
    """Job ids sorted per (tenant, status), and the jobs held by each worker."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.entries: dict[str, IndexEntry] = {}
        self._lists: dict[_ListKey, SortedList] = {}
        self._by_worker: dict[str, set[str]] = {}
        #: Jobs waiting in the queue (``queued``, any dispatch generation).
        self._waiting: set[str] = set()
        #: Jobs that became (or were again written as) waiting since :meth:`take_new_waiting`.
        self._new_waiting: list[str] = []
        #: Set once the bucket's contents at start have been read.
        self.ready = asyncio.Event()
        self.malformed = 0
        self._watcher: KeyValue.KeyWatcher | None = None
        self._initial_seq = 0

    # ------------------------------------------------------------------ the watch

    async def open(self) -> None:
        """Start the watch (the caller runs :meth:`follow` as a supervised task)."""
        state = (await self.kv.status()).stream_info.state
        self._initial_seq = state.last_seq if state.messages else 0
        if self._initial_seq == 0:
            self.ready.set()
        self._watcher = await self.kv.watchall()

    async def follow(self) -> None:
        """Apply every update of the bucket until cancelled."""
        watcher = self._watcher
        assert watcher is not None, "open() first"
        try:
            async for entry in watcher:
                if entry is None:
                    if not self.ready.is_set() and self._initial_seq:
                        continue  # nats-py's own marker may come early; the sequence decides
                    self.ready.set()
                    continue
                if entry.operation is None and entry.value:
                    self._apply(entry.key, entry.value)
                else:
                    self._remove(entry.key)
                if not self.ready.is_set() and (entry.delta == 0 or (entry.revision or 0) >= self._initial_seq):
                    log.info("job index ready: %d jobs", len(self.entries))
                    self.ready.set()
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _apply(self, key: str, value: bytes) -> None:
        try:
            view = _decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.malformed += 1
            log.warning("job index skips the malformed record %s: %s", key, e)
            return
        last = view.attempts[-1] if view.attempts else None
        held = view.status in HELD_STATUSES and last is not None and last.ended_at is None
        old = self.entries.get(key)
        now = time.monotonic()
        held_since = None
        if held:
            same_attempt = old is not None and old.held and old.attempt == view.attempt
            held_since = old.held_since if same_attempt and old is not None else now
        cancelling_since = None
        if view.status == "cancelling":
            cancelling_since = old.cancelling_since if old is not None and old.cancelling_since else now
        queued_since = None
        if view.status == "queued":
            if old is not None and old.queued_since is not None and old.dispatch == view.dispatch:
                queued_since = old.queued_since
            else:
                age = (datetime.now(UTC) - view.updated_at).total_seconds()
                queued_since = now - max(0.0, age)
        entry = IndexEntry(
            job_id=key,
            status=view.status,
            tenant=view.tenant,
            model=(view.spec.model.family, view.spec.model.version),
            worker_id=view.worker_id if held else None,
            attempt=view.attempt,
            timeout_s=view.spec.timeout_seconds,
            dispatch_seq=last.dispatch_seq if last is not None else None,
            dispatch=view.dispatch,
            runtime=view.runtime,
            dead_letter=view.dead_letter,
            queue_timeout_s=view.spec.queue_timeout_seconds,
            queued_seq=view.queued_seq if view.dispatch == 0 else None,
            held_since=held_since,
            cancelling_since=cancelling_since,
            queued_since=queued_since,
        )
        self.entries[key] = entry
        if old is None:
            self._link(entry)
        else:  # most writes move a job between a few lists: leave it in the others
            self._relink(old, entry)

    def _remove(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._unlink(old)

    def forget(self, job_id: str) -> None:
        """Drop a job whose record is gone (expired without a marker)."""
        self._remove(job_id)

    def _keys(self, e: IndexEntry) -> list[_ListKey]:
        statuses: list[str | None] = [None, e.status]
        if e.dead_letter:
            statuses.append(DEAD_LETTER)
        tenants: list[str | None] = [None] if e.tenant is None else [None, e.tenant]
        return [(t, s) for t in tenants for s in statuses]

    def _link(self, e: IndexEntry, keys: list[_ListKey] | None = None) -> None:
        for k in self._keys(e) if keys is None else keys:
            lst = self._lists.get(k)
            if lst is None:
                lst = self._lists[k] = SortedList()
            lst.add(e.job_id)
        if e.worker_id is not None:
            self._by_worker.setdefault(e.worker_id, set()).add(e.job_id)
        if e.status == "queued":
            self._waiting.add(e.job_id)
            self._new_waiting.append(e.job_id)

    def _relink(self, old: IndexEntry, new: IndexEntry) -> None:
        before, after = self._keys(old), self._keys(new)
        self._unlink(old, [k for k in before if k not in after])
        self._link(new, [k for k in after if k not in before])

    def _unlink(self, e: IndexEntry, keys: list[_ListKey] | None = None) -> None:
        for k in self._keys(e) if keys is None else keys:
            lst = self._lists.get(k)
            if lst is not None:
                lst.discard(e.job_id)
                if not lst:
                    del self._lists[k]
        if e.worker_id is not None:
            held = self._by_worker.get(e.worker_id)
            if held is not None:
                held.discard(e.job_id)
                if not held:
                    del self._by_worker[e.worker_id]
        self._waiting.discard(e.job_id)

    # ------------------------------------------------------------------ queries

    def page(
        self,
        *,
        tenant: str | None,
        statuses: set[str] | None,
        model: tuple[str, str] | None,
        cursor: str | None,
        limit: int,
        max_scan: int,
        dead_letter: bool = False,
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` job ids, newest first, below ``cursor``; and the cursor of the next
        page (None: no more). At most ``max_scan`` ids are looked at: a filter no index
        covers (``model``; ``statuses`` with ``dead_letter``) may give a short page that
        still has a next cursor."""
        if dead_letter:
            keys: list[_ListKey] = [(tenant, DEAD_LETTER)]
        else:
            keys = [(tenant, s) for s in sorted(statuses)] if statuses else [(tenant, None)]
        runs = [
            lst.irange(maximum=cursor, inclusive=(True, False), reverse=True)
            for k in keys if (lst := self._lists.get(k)) is not None
        ]
        ids: Iterator[str] = heapq.merge(*runs, reverse=True) if len(runs) > 1 else iter(runs[0] if runs else ())
        out: list[str] = []
        for scanned, job_id in enumerate(ids, start=1):
            e = self.entries[job_id]
            if (model is None or e.model == model) and (not dead_letter or not statuses or e.status in statuses):
                out.append(job_id)
                if len(out) > limit:
                    return out[:limit], out[limit - 1]
            if scanned >= max_scan:
                return out, job_id
        return out, None

    def count(self, tenant: str | None, status: str) -> int:
        """How many jobs of ``tenant`` (None: every tenant) are in ``status`` now."""
        lst = self._lists.get((tenant, status))
        return 0 if lst is None else len(lst)

    def held_by(self, worker_id: str) -> list[IndexEntry]:
        """The jobs ``worker_id`` holds now (claimed, not ended), however recently claimed."""
        return [self.entries[j] for j in self._by_worker.get(worker_id, ())]

    def holders(self) -> set[str]:
        """Every worker that holds a job."""
        return set(self._by_worker)

    def held(self) -> Iterator[IndexEntry]:
        """Every job some worker holds."""
        for jobs in list(self._by_worker.values()):
            for job_id in list(jobs):
                entry = self.entries.get(job_id)
                if entry is not None:
                    yield entry

    def take_new_waiting(self) -> list[IndexEntry]:
        """Jobs that entered the queue (or were written while in it) since the last call:
        whoever watches waiting jobs schedules them from here instead of visiting every
        waiting job on every pass (a queue of 10^6 jobs costs a second a pass)."""
        ids, self._new_waiting = self._new_waiting, []
        return [self.entries[j] for j in ids if j in self._waiting]

    def waiting_entry(self, job_id: str) -> IndexEntry | None:
        """The job's entry if it is in the queue, unclaimed; else None."""
        return self.entries.get(job_id) if job_id in self._waiting else None

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def __len__(self) -> int:
        return len(self.entries)
