"""Backpressure: a bound on the jobs queued per runtime.

The count comes from one ``STREAM.INFO`` (``subjects_filter``) of the dispatch stream, which
holds every job that is queued or being worked on. It is refreshed in the background
while submissions arrive (at most every ``refresh_s``), never on the request path, so the
bound is approximate by up to ``refresh_s`` worth of submissions; an idle control plane
asks nothing (a metrics scrape refreshes stale counts too, see :meth:`QueueDepth.ensure_fresh`).
Beyond the bound, submit fails fast with ``queue_full`` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.client import Client as NATS

from mnemos.errors import QueueFull
from mnemos.names import Names
from mnemos.tasks import Supervisor, cancel_and_wait

__all__ = ["QueueDepth", "dispatch_subject_counts"]

log = logging.getLogger("mnemos.control_plane")


class _StreamState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _StreamInfo(msgspec.Struct):
    state: _StreamState | None = None


_info_decoder = msgspec.json.Decoder(_StreamInfo)


async def dispatch_subject_counts(nc: NATS, names: Names, timeout: float = 5.0) -> dict[str, int]:
    """Messages per subject of the dispatch stream (``<runtime>.<priority>.<model>``): one
    ``STREAM.INFO`` with a subject filter, decoded without nats-py's reflective StreamInfo.
    What the backpressure bound and the autoscaler count (queued and running jobs)."""
    reply = await nc.request(
        names.stream_info_subject(names.dispatch_stream),
        msgspec.json.encode({"subjects_filter": names.dispatch_all}),
        timeout=timeout,
    )
    state = _info_decoder.decode(reply.data).state
    return dict(state.subjects or {}) if state is not None else {}


class QueueDepth:
    """Queued jobs per runtime (and per priority level), refreshed by one-shot tasks of
    ``supervisor`` (named ``queue-depth-refresh``; a failed refresh is logged and retried,
    never fatal)."""

    def __init__(self, nc: NATS, names: Names, limit: int, refresh_s: float = 0.25,
                 supervisor: Supervisor | None = None) -> None:
        self.nc = nc
        self.supervisor = supervisor if supervisor is not None else Supervisor("control-plane")
        self.names = names
        self.limit = limit
        self.refresh_s = refresh_s
        self.by_runtime: dict[str, int] = {}
        self.by_level: dict[tuple[str, int], int] = {}
        self._at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False

    def check(self, runtime: str) -> None:
        """Raise QueueFull if ``runtime``'s queue is at the bound; refresh the counts if stale."""
        if time.monotonic() - self._at > self.refresh_s and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = self._spawn_refresh()
        queued = self.by_runtime.get(runtime, 0)
        if queued >= self.limit:
            raise QueueFull(
                f"{queued} {runtime} jobs are queued (limit {self.limit}); retry later",
                details={"runtime": runtime, "queued": queued, "limit": self.limit, "retry_after_s": 1},
            )

    async def ensure_fresh(self) -> None:
        """Refresh the counts unless they are at most ``refresh_s`` old (a metrics scrape:
        however often it comes, at most one ``STREAM.INFO`` per ``refresh_s``)."""
        if self._closed or time.monotonic() - self._at <= self.refresh_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._spawn_refresh()
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)  # a cancelled scrape leaves it to finish

    def _spawn_refresh(self) -> asyncio.Task[None] | None:
        return self.supervisor.spawn_oneshot("queue-depth-refresh", self.refresh())

    async def close(self) -> None:
        """Stop a refresh in flight and start no more for scrapes (control-plane shutdown)."""
        self._closed = True
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            await cancel_and_wait(task)

    async def refresh(self) -> None:
        """Read the per-subject counts of the dispatch stream."""
        try:
            subjects = await dispatch_subject_counts(self.nc, self.names)
        except Exception as e:  # a failed refresh keeps the last counts; it is retried
            log.warning("queue depth refresh failed: %r", e)
            return
        by_runtime: dict[str, int] = {}
        by_level: dict[tuple[str, int], int] = {}
        for subject, n in subjects.items():
            try:
                runtime, priority, _model = Names.parse_dispatch_subject(subject)
            except (IndexError, ValueError):
                continue
            by_runtime[runtime] = by_runtime.get(runtime, 0) + n
            by_level[(runtime, priority)] = by_level.get((runtime, priority), 0) + n
        self.by_runtime, self.by_level, self._at = by_runtime, by_level, time.monotonic()
