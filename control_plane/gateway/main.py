"""``mnemos gateway``: serve HTTP until SIGINT/SIGTERM, then stop (requests first, NATS last).

It exits non-zero (so ``mnemos up`` or the container runtime restarts it) when its HTTP
server ends by itself or a supervised background task of the gateway dies.
"""

from __future__ import annotations

import asyncio
import logging

from control_plane.gateway.app import create_app
from control_plane.gateway.auth import ApiKeys, check_bind
from control_plane.gateway.config import GatewaySettings
from control_plane.gateway.deps import GatewayState
from mnemos.asgi import AsgiServer
from mnemos.config import NatsSettings
from mnemos.tasks import BackgroundTaskDied

__all__ = ["serve", "build_server"]

log = logging.getLogger("mnemos.gateway")


def _build(nats_settings: NatsSettings, settings: GatewaySettings) -> tuple[AsgiServer, GatewayState]:
    keys = ApiKeys.from_settings(settings)
    check_bind(settings.host, keys)
    if not keys.enabled:
        log.warning("no API keys configured: serving on loopback only (%s), without authentication",
                    settings.host)
    else:
        log.info("API keys configured for %d tenant(s)", len(keys.tenants))
    app = create_app(settings, nats_settings, keys=keys)
    return AsgiServer(app, settings.host, settings.port, lifespan="on"), app.state.gateway


def build_server(nats_settings: NatsSettings, settings: GatewaySettings) -> AsgiServer:
    """The server, after checking that it may bind where it is told to (ValueError if not)."""
    return _build(nats_settings, settings)[0]


async def serve(nats_settings: NatsSettings, settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Serve until ``stop``; raise (exit non-zero) if the server or a supervised task dies."""
    server, state = _build(nats_settings, settings)
    try:
        await server.start()
    except OSError as e:
        raise ValueError(f"cannot serve HTTP on {settings.host}:{settings.port}: {e.strerror or e}") from e
    port = server.port  # (unreadable once the socket is closed)
    log.info("gateway serving http://%s:%d", settings.host, port)
    ending = asyncio.Event()  # stop asked, or a supervised task died: stop serving
    serving = asyncio.ensure_future(server.serve_until(ending))
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(state.supervisor.failed.wait())
    try:
        await asyncio.wait({serving, stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ending.set()
        stopping.cancel()
        failing.cancel()
        try:
            await serving  # the server's own crash, if any, is raised here
        except Exception as e:
            log.error("gateway HTTP server on port %d died: %r", port, e, exc_info=e)
            raise
    state.supervisor.raise_if_failed()
    if not stop.is_set():
        log.error("gateway HTTP server on port %d stopped by itself", port)
        raise BackgroundTaskDied(f"the gateway's HTTP server on port {port} stopped by itself")
