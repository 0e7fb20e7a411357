"""What one control plane works on at once, and what it sheds.

A request is admitted when it arrives (in the NATS subscription's callback, which only
counts and spawns a task, so the subscription never backs up and no burst can make the
connection a slow consumer). Beyond ``max_in_flight`` requests at once, a request is shed
at once with ``unavailable`` and a ``retry_after_s`` hint (HTTP ``Retry-After``), never
queued without bound. ``jobs.list`` reads records, so it has its own, smaller bound: a few
run at a time, a bounded number wait for a turn, the rest are shed. A ``jobs.run`` that
waits for a job already running under its idempotency key leaves the in-flight count for a
bounded set of waiters, so waiting callers cannot crowd out new requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mnemos.errors import Unavailable

__all__ = ["Admission"]


class Admission:
    def __init__(
        self,
        *,
        max_in_flight: int,
        max_lists: int,
        max_lists_waiting: int,
        max_waiters: int,
        retry_after_s: int = 1,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_lists_waiting = max_lists_waiting
        self.max_waiters = max_waiters
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.lists_waiting = 0
        self.waiters = 0
        self.shed = 0
        self._lists = asyncio.Semaphore(max_lists)

    def _shed(self, what: str) -> Unavailable:
        self.shed += 1
        return Unavailable(
            f"the control plane is at capacity ({what}); retry in {self.retry_after_s}s",
            details={"retry_after_s": self.retry_after_s, "reason": "overloaded"},
        )

    def admit(self) -> None:
        """Count a request in, or raise the shed ``Unavailable``."""
        if self.in_flight >= self.max_in_flight:
            raise self._shed(f"{self.in_flight} requests in flight")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @asynccontextmanager
    async def list_turn(self) -> AsyncIterator[None]:
        """Hold one of the few ``jobs.list`` turns (waiting for one, boundedly)."""
        if self._lists.locked() and self.lists_waiting >= self.max_lists_waiting:
            raise self._shed(f"{self.lists_waiting} job listings waiting")
        self.lists_waiting += 1
        try:
            await self._lists.acquire()
        finally:
            self.lists_waiting -= 1
        try:
            yield
        finally:
            self._lists.release()

    @asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """Move an admitted request from the in-flight count to the waiters while it waits
        for something that takes long (a job to finish)."""
        if self.waiters >= self.max_waiters:
            raise self._shed(f"{self.waiters} callers waiting for jobs")
        self.waiters += 1
        self.in_flight -= 1
        try:
            yield
        finally:
            self.in_flight += 1
            self.waiters -= 1
