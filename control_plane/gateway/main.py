"""``mnemos gateway``: serve HTTP until SIGINT/SIGTERM, then stop (requests first, NATS last)."""

from __future__ import annotations

import asyncio
import logging

from control_plane.gateway.app import create_app
from control_plane.gateway.auth import ApiKeys, check_bind
from control_plane.gateway.config import GatewaySettings
from mnemos.asgi import AsgiServer
from mnemos.config import NatsSettings

__all__ = ["serve", "build_server"]

log = logging.getLogger("mnemos.gateway")


def build_server(nats_settings: NatsSettings, settings: GatewaySettings) -> AsgiServer:
    """The server, after checking that it may bind where it is told to (ValueError if not)."""
    keys = ApiKeys.from_settings(settings)
    check_bind(settings.host, keys)
    if not keys.enabled:
        log.warning("no API keys configured: serving on loopback only (%s), without authentication",
                    settings.host)
    else:
        log.info("API keys configured for %d tenant(s)", len(keys.tenants))
    app = create_app(settings, nats_settings, keys=keys)
    return AsgiServer(app, settings.host, settings.port, lifespan="on")


async def serve(nats_settings: NatsSettings, settings: GatewaySettings, stop: asyncio.Event) -> None:
    server = build_server(nats_settings, settings)
    try:
        await server.start()
    except OSError as e:
        raise ValueError(f"cannot serve HTTP on {settings.host}:{settings.port}: {e.strerror or e}") from e
    log.info("gateway serving http://%s:%d", settings.host, server.port)
    await server.serve_until(stop)
