"""Job records in the ``mnemos_jobs`` KV bucket, changed only by compare-and-set.

Both the control plane and the workers write job records; every write names the revision
it read (``Nats-Expected-Last-Subject-Sequence``), so two writers never silently
overwrite each other: the loser gets :class:`~mnemos.errors.Conflict`, re-reads and
decides again. This is what makes "a job completes at most once" hold.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from mnemos.errors import Conflict, JobNotFound, ValidationFailed
from mnemos.jetstream import Publisher
from mnemos.kvscan import kv_values
from mnemos.names import Names
from mnemos.messages import JobRecord, decode, encode, utcnow

__all__ = ["JobStore", "check_job_id"]

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it can be a KV key, else raise ValidationFailed."""
    if not _JOB_ID_RE.match(job_id):
        raise ValidationFailed(f"invalid job id {job_id!r}")
    return job_id


class JobStore:
    """Typed access to job records (writes go through the lean :func:`kv_cas`)."""

    def __init__(self, publisher: Publisher, kv: KeyValue, bucket: str) -> None:
        self.publisher = publisher
        self.kv = kv
        self._js = publisher.nc.jetstream()
        self.bucket = bucket

    async def create(self, record: JobRecord, data: bytes | None = None) -> int:
        """Store a new record (or its already encoded ``data``); its revision. Raises
        Conflict if the id exists."""
        subject = Names.kv_key_subject(self.bucket, record.job_id)
        try:
            return await self.publisher.kv_cas(subject, data if data is not None else encode(record), 0)
        except Conflict as e:
            raise Conflict(f"job {record.job_id} already exists") from e

    async def get(self, job_id: str, *, fresh: bool = False) -> tuple[JobRecord, int]:
        """The record and its revision; raises JobNotFound.

        A plain read may be answered by any replica of a clustered bucket (direct get),
        which can be a write behind. ``fresh`` asks the stream's leader, which has every
        acknowledged write: read so after a compare-and-set lost, or a replica may answer
        with the very revision that lost (or with no record at all, for one just created).
        """
        check_job_id(job_id)
        try:
            if fresh:
                msg = await self._js.get_msg(  # nats-py's KV offers no leader read: the stream's API does
                    Names.kv_stream(self.bucket), subject=Names.kv_key_subject(self.bucket, job_id), direct=False)
                if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
                    raise JobNotFound(f"no job {job_id}")
                value, revision = msg.data, msg.seq
            else:
                entry = await self.kv.get(job_id)
                value, revision = entry.value, entry.revision
        except (KeyNotFoundError, NotFoundError) as e:
            raise JobNotFound(f"no job {job_id}") from e
        if not value or revision is None:
            raise JobNotFound(f"no job {job_id}")
        return decode(value, JobRecord), revision

    async def update(self, record: JobRecord, revision: int, data: bytes | None = None) -> int:
        """Write ``record`` (or its already encoded ``data``) if the stored revision is still
        ``revision``; the new revision."""
        subject = Names.kv_key_subject(self.bucket, record.job_id)
        try:
            return await self.publisher.kv_cas(subject, data if data is not None else encode(record), revision)
        except Conflict as e:
            raise Conflict(f"job {record.job_id} changed since revision {revision}") from e

    async def mutate(
        self,
        job_id: str,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        tries: int = 20,
    ) -> tuple[JobRecord, int]:
        """Read-modify-write with compare-and-set, retried on conflict.

        ``change`` returns the new record, or None to leave it as it is (the current
        record is returned then). ``updated_at`` is set on every write.
        """
        fresh = False
        for _ in range(tries):
            record, revision = await self.get(job_id, fresh=fresh)
            new = change(record)
            if new is None:
                return record, revision
            new.updated_at = utcnow()
            try:
                return new, await self.update(new, revision)
            except Conflict:
                fresh = True  # a replica may have answered a write behind
        raise Conflict(f"job {job_id} kept changing; gave up after {tries} tries")

    async def scan(self) -> AsyncIterator[JobRecord]:
        """Every job record (O(number of jobs kept); see docs on retention)."""
        async for _key, value, _rev in kv_values(self.kv):
            yield decode(value, JobRecord)
