"""A lean JetStream publish-with-ack for the hot path.

``js.publish`` in nats-py draws a random token per request and parses every ack with
``json.loads`` and a reflective dataclass; at thousands of jobs per second that is a
visible share of a core. :class:`Publisher` sends the same messages (optionally with
``Nats-Expected-Last-Subject-Sequence``, which is all a KV compare-and-set is) with
counter tokens on one inbox and decodes acks with a msgspec Struct. Ack deadlines are kept
in one heap, checked by one timer, rather than a timer per message.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mnemos.errors import Conflict, Unavailable

__all__ = ["Publisher"]

_HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
#: "wrong last sequence" (a compare-and-set lost): 10071 names the expected sequence; a
#: clustered stream answers 10164 for the same thing.
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class Publisher:
    """Publishes to JetStream and awaits acks on one wildcard inbox of its own.

    Cheaper than ``nc.request`` per message (no random token per request, no reflective
    ack parsing), and it is what every hot-path write uses: job records (compare-and-set),
    dispatch messages, result messages. ``start()`` before use; safe to share.
    """

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._sub: Subscription | None = None
        #: (deadline on the loop's clock, token, subject) of every ack awaited; entries
        #: whose ack came are skipped when they fall due.
        self._deadlines: list[tuple[float, int, str]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        if self._sub is None:
            self._prefix = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_ack)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if sub is not None:
            await sub.unsubscribe()

    def _expire(self) -> None:
        """Fail the acks that are past their deadline; re-arm for the next one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, token, subject = heapq.heappop(heap)
            fut = self._waiting.pop(str(token), None)
            if fut is not None and not fut.done():
                fut.set_exception(Unavailable(f"no ack from JetStream for {subject} in time"))
        if heap:
            self._timer = loop.call_at(heap[0][0], self._expire)

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[len(self._prefix) + 1 :], None)  # expired ones are gone
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(Unavailable(f"no stream stores that subject ({msg.headers})"))
        else:
            fut.set_result(msg.data)

    async def send(
        self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> asyncio.Future[bytes]:
        """Publish without waiting; the future of the raw ack (check it with :meth:`acked`),
        failed with :class:`Unavailable` if no ack comes within ``timeout`` seconds.

        Messages sent one after another from one task are stored in that order.
        """
        if self._sub is None:
            raise Unavailable("the JetStream publisher is not started")
        n = next(self._ids)
        token = str(n)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._waiting[token] = fut
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        deadline = loop.time() + timeout
        heapq.heappush(self._deadlines, (deadline, n, subject))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        elif deadline < self._timer.when():
            self._timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        return fut

    async def acked(self, fut: asyncio.Future[bytes], subject: str) -> int:
        """Wait for an ack from :meth:`send`; the stored sequence (errors as in :meth:`publish`)."""
        return (await self._ack(fut, subject)).seq

    async def _ack(self, fut: asyncio.Future[bytes], subject: str) -> _PubAck:
        data = await fut  # Unavailable past the deadline given to send()
        try:
            ack = _ack_decoder.decode(data)
        except msgspec.DecodeError as e:
            raise Unavailable(f"unreadable JetStream ack for {subject}: {data[:200]!r}") from e
        if ack.error is not None:
            if ack.error.err_code in _WRONG_LAST_SEQUENCE:
                raise Conflict(f"{subject} changed: {ack.error.description}")
            raise Unavailable(f"JetStream refused {subject}: {ack.error.description} ({ack.error.err_code})")
        return ack

    async def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> int:
        """Publish to a stream and wait for its ack; the stored sequence.

        Raises :class:`Conflict` when an expected-sequence header did not match and
        :class:`Unavailable` when no stream answered or the stream refused the message.
        """
        return await self.acked(await self.send(subject, payload, headers=headers, timeout=timeout), subject)

    async def publish_once(
        self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float = 5.0
    ) -> tuple[int, bool]:
        """Publish a message with a ``Nats-Msg-Id``; (its sequence, whether it was stored now:
        False when the stream already had that id within its duplicate window)."""
        ack = await self._ack(await self.send(subject, payload, headers=headers, timeout=timeout), subject)
        return ack.seq, not ack.duplicate

    async def kv_cas(self, key_subject: str, value: bytes, last: int, *, timeout: float = 5.0) -> int:
        """Write a KV key (its ``$KV.<bucket>.<key>`` subject) only if its current revision
        is ``last`` (0: only if absent); the new revision."""
        return await self.publish(
            key_subject, value, headers={_HDR_EXPECTED_LAST_SUBJECT_SEQ: str(last)}, timeout=timeout
        )
