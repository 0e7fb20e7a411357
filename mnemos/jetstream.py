"""A lean JetStream publish-with-ack for the hot path.

``js.publish`` in nats-py parses every ack with ``json.loads`` and a reflective dataclass;
at thousands of jobs per second that is a visible share of a core. This sends the same
request (optionally with ``Nats-Expected-Last-Subject-Sequence``, which is all a KV
compare-and-set is) and decodes the ack with a msgspec Struct.
"""

from __future__ import annotations

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from mnemos.errors import Conflict, Unavailable

__all__ = ["publish_acked", "kv_cas"]

_HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = 10071


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


async def publish_acked(
    nc: NATS,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """Publish to a stream and wait for its ack; the stored sequence.

    Raises :class:`Conflict` when an expected-sequence header did not match and
    :class:`Unavailable` when no stream answered or the stream refused the message.
    """
    try:
        msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError as e:
        raise Unavailable(f"no stream stores {subject}") from e
    except nats.errors.TimeoutError as e:
        raise Unavailable(f"no ack from JetStream for {subject} within {timeout}s") from e
    try:
        ack = _ack_decoder.decode(msg.data)
    except msgspec.DecodeError as e:
        raise Unavailable(f"unreadable JetStream ack for {subject}: {msg.data[:200]!r}") from e
    if ack.error is not None:
        if ack.error.err_code == _WRONG_LAST_SEQUENCE:
            raise Conflict(f"{subject} changed: {ack.error.description}")
        raise Unavailable(f"JetStream refused {subject}: {ack.error.description} ({ack.error.err_code})")
    return ack.seq


async def kv_cas(nc: NATS, key_subject: str, value: bytes, last: int, *, timeout: float = 5.0) -> int:
    """Write a KV key (its ``$KV.<bucket>.<key>`` subject) only if its current revision is
    ``last`` (0: only if absent); the new revision."""
    return await publish_acked(
        nc,
        key_subject,
        value,
        headers={_HDR_EXPECTED_LAST_SUBJECT_SEQ: str(last)},
        timeout=timeout,
    )
