"""The autoscaler's leader lease: one KV key, written with compare-and-set and a TTL.

Any number of autoscalers run; the one holding ``<ns>_autoscaler.leader`` acts. The key is
written with a per-message TTL (``Nats-TTL``): the *server* removes it when its holder
stops renewing, so no two clocks are compared. Whoever finds it gone writes it with
``Nats-Expected-Last-Subject-Sequence`` set to what it saw; of several that try at once,
one succeeds. The holder renews it the same way (a lost compare-and-set means it lost the
lease), and acts only while its last renewal is younger than the TTL by a margin, so a
holder cut off from NATS stops before another can start. A holder that stops cleanly
deletes the key, and a standby takes over at its next try instead of after the TTL.
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from mnemos.errors import Conflict, Unavailable, ValidationFailed
from mnemos.messages import LeaseRecord, decode, encode, utcnow
from mnemos.names import Names

__all__ = ["Lease"]

log = logging.getLogger("mnemos.autoscaler.lease")

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class Lease:
    """Try to hold the lease with :meth:`tick` (every ``renew`` seconds); :attr:`held`
    says whether this instance may act now."""

    def __init__(self, js: JetStreamContext, names: Names, holder: str, ttl_s: float) -> None:
        self.js = js
        self.names = names
        self.holder = holder
        self.ttl_s = ttl_s
        self.bucket = names.autoscaler_bucket
        self.subject = Names.kv_key_subject(self.bucket, Names.AUTOSCALER_LEASE_KEY)
        self._revision = 0
        self._valid_until = 0.0
        self._acquired_at = utcnow()
        #: Who holds it, as last seen (None: nobody).
        self.seen_holder: str | None = None
        self.acquired = 0  # times this instance became the leader

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    @property
    def margin_s(self) -> float:
        """Act only while the last renewal is younger than TTL minus this."""
        return max(0.5, self.ttl_s / 4)

    async def _current(self) -> tuple[int, LeaseRecord | None]:
        """(revision of the key's last message, the lease it holds or None when free)."""
        try:
            msg = await self.js.get_last_msg(Names.kv_stream(self.bucket), self.subject)
        except NotFoundError:
            return 0, None
        headers = msg.headers or {}
        if not msg.data or headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            return msg.seq or 0, None
        try:
            return msg.seq or 0, decode(msg.data, LeaseRecord)
        except ValidationFailed:
            log.warning("unreadable lease in %s; taking it over", self.subject)
            return msg.seq or 0, None

    async def _write(self, last: int) -> int:
        now = utcnow()
        record = LeaseRecord(holder=self.holder, acquired_at=self._acquired_at, renewed_at=now, ttl_s=self.ttl_s)
        try:
            ack = await self.js.publish(self.subject, encode(record), headers={_EXPECTED_LAST: str(last)},
                                        msg_ttl=max(1.0, self.ttl_s))
        except APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                raise Conflict(f"the lease changed: {e.description}") from e
            raise Unavailable(f"lease write refused: {e}") from e
        return int(ack.seq)

    async def tick(self) -> bool:
        """Renew the lease if held, else take it if free; whether it is held now. NATS
        errors are not raised: they leave the lease to expire (the caller stops acting)."""
        sent = time.monotonic()
        try:
            if self._revision and self.held:
                try:
                    self._revision = await self._write(self._revision)
                    self._valid_until = sent + self.ttl_s - self.margin_s
                    return True
                except Conflict:
                    log.warning("%s lost the autoscaler lease", self.holder)
                    self._drop()
            revision, current = await self._current()
            self.seen_holder = current.holder if current is not None else None
            if current is not None and current.holder != self.holder:
                return False
            self._acquired_at = utcnow()
            self._revision = await self._write(revision)
            self._valid_until = sent + self.ttl_s - self.margin_s
            self.seen_holder = self.holder
            self.acquired += 1
            log.info("%s holds the autoscaler lease", self.holder)
            return True
        except Conflict:
            self._drop()  # another instance took it first
            return False
        except Exception as e:  # noqa: BLE001 - NATS away: the lease lapses, nobody acts twice
            if self._revision:
                log.warning("lease renewal failed (%r); acting until it would expire", e)
            return self.held

    def _drop(self) -> None:
        self._revision = 0
        self._valid_until = 0.0

    async def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next try."""
        if not self._revision:
            return
        revision, self._revision = self._revision, 0
        self._valid_until = 0.0
        try:
            kv = await self.js.key_value(self.bucket)
            await kv.delete(Names.AUTOSCALER_LEASE_KEY, last=revision)
        except Exception as e:  # noqa: BLE001 - it expires by itself anyway
            log.info("lease not released (%r); it expires within %.0fs", e, self.ttl_s)
