"""Opening a NATS connection the same way in every process."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS

from mnemos.auth import creds_identity
from mnemos.config import NatsSettings
from mnemos.errors import Unavailable

__all__ = ["connect", "unavailable_from", "barrier", "patiently", "refused_publish"]

log = logging.getLogger("mnemos.nats")


def unavailable_from(e: BaseException) -> Unavailable | None:
    """The retryable :class:`Unavailable` for a nats-py error that means "NATS or JetStream
    cannot serve this right now" (no responders, timeouts, a stream electing a leader, a
    closed or reconnecting connection); None for anything else."""
    import nats.errors
    import nats.js.errors

    if isinstance(e, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError,
                      nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                      nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                      nats.errors.StaleConnectionError, TimeoutError, ConnectionError)):
        return Unavailable(f"NATS cannot serve this right now: {type(e).__name__}: {e}")
    if isinstance(e, nats.js.errors.ServiceUnavailableError) or (
        isinstance(e, nats.js.errors.APIError) and e.code == 503
    ):
        return Unavailable(f"JetStream is temporarily unavailable: {e}")
    return None


T = TypeVar("T")

#: Subjects nats-server refused to let each connection (made by :func:`connect`) publish
#: on, lower-cased as nats-py reports them; the latest few.
_REFUSED: weakref.WeakKeyDictionary[NATS, dict[str, None]] = weakref.WeakKeyDictionary()
_REFUSED_KEPT = 64
_REFUSAL = re.compile(r'permissions violation for publish to "([^"]+)"')


def refused_publish(nc: NATS, subject: str) -> bool:
    """Whether nats-server refused ``nc`` (its credentials) publishing on ``subject``: what a
    request that got no answer hit (the server drops the message and tells the sender
    only through an asynchronous error)."""
    return subject.lower() in _REFUSED.get(nc, {})


def _note_refusal(nc: NATS, error: Exception) -> None:
    match = _REFUSAL.search(str(error).lower())
    if match is not None:
        seen = _REFUSED.setdefault(nc, {})
        seen[match.group(1)] = None
        while len(seen) > _REFUSED_KEPT:
            del seen[next(iter(seen))]

#: How long a process keeps trying a call NATS cannot serve (a node lost, a leader being
#: elected) before it gives up.
_PATIENCE_S = 120.0


async def patiently(step: Callable[[], Awaitable[T]], what: str) -> T:
    """Run ``step`` (a NATS or JetStream API call), again while NATS cannot serve it (a node
    lost, a leader being elected), for up to two minutes; then its :class:`Unavailable`.
    A process that starts during such a spell waits it out instead of exiting."""
    deadline = time.monotonic() + _PATIENCE_S
    delay = 0.25
    while True:
        try:
            return await step()
        except Exception as e:
            unavailable = unavailable_from(e)
            if unavailable is None:
                raise
            if time.monotonic() > deadline:
                raise unavailable from e
            log.warning("NATS cannot %s yet (%s); retrying in %.2fs", what, unavailable.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def barrier(nc: NATS, timeout: float = 10.0) -> None:
    """Return once the server has processed everything ``nc`` sent so far (its
    subscriptions above all: after this, requests from any client reach them).

    ``nc.flush()`` alone is not that barrier in nats-py 2.16: it writes its PING straight to
    the socket, ahead of commands still in the client's buffer, so its PONG can come back
    before a SUB just made has reached the server (a request sent then gets "no
    responders"). The buffer is written out first.
    """
    await nc._flush_pending(force_flush=True)  # noqa: SLF001 - the buffer nats-py's flush() skips
    await nc.flush(timeout=int(max(1, timeout)))


async def connect(settings: NatsSettings, name: str, **options: Any) -> NATS:
    """Connect to NATS with reconnects forever and every async error logged (never dropped)."""

    holder: list[NATS] = []
    before_connected: list[Exception] = []  # why the first connection is not made yet

    async def error_cb(e: Exception) -> None:
        # Before the first connection the failure is raised to the caller; after, log it.
        log.log(logging.WARNING if holder else logging.DEBUG, "nats error on %s: %r", name, e)
        if not holder:
            before_connected[:] = [e]
        else:
            _note_refusal(holder[0], e)

    async def disconnected_cb() -> None:
        closing = bool(holder) and (holder[0].is_closed or holder[0].is_draining)
        log.log(logging.DEBUG if closing else logging.WARNING, "nats disconnected (%s)", name)

    async def reconnected_cb() -> None:
        log.info("nats reconnected (%s)", name)

    opts: dict[str, Any] = dict(
        servers=settings.servers,
        name=name,
        connect_timeout=settings.nats_connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        pending_size=64 * 1024 * 1024,
        flush_timeout=10,
    )
    tls = settings.tls_context()
    if tls is not None:
        opts["tls"] = tls
    creds = settings.creds_file
    if creds is not None:
        opts["user_credentials"] = str(creds)
        identity = creds_identity(creds)
        if identity is not None:  # its permissions allow replies under its own prefix only
            opts["inbox_prefix"] = identity.inbox_prefix
    opts.update(options)
    try:
        # nats-py keeps trying unreachable servers forever; the first connection is bounded
        # (a process that cannot reach NATS at start fails fast and says so).
        nc = await asyncio.wait_for(nats.connect(**opts), timeout=2 * settings.nats_connect_timeout_s)
        holder.append(nc)
        return nc
    except Exception as e:  # nats raises several unrelated types for "cannot connect"
        hint = ""
        if before_connected and not isinstance(before_connected[-1], type(e)):
            hint = f" ({before_connected[-1]})"
        if any("authorization violation" in str(x).lower() for x in (e, *before_connected)):
            hint = " (nats-server: Authorization Violation: " + (
                f"it refused the credentials in {creds})" if creds else
                "it wants credentials: set MNEMOS_NATS_CREDS, or MNEMOS_DATA_DIR to the data directory of `mnemos up`)")
        raise Unavailable(f"cannot connect to NATS at {settings.nats_url}: {e!r}{hint}") from e
