"""``mnemos control-plane``: serve until SIGINT/SIGTERM, then stop in order."""

from __future__ import annotations

import asyncio
import logging

from control_plane.config import ControlPlaneSettings
from control_plane.service import ControlPlane
from mnemos.config import NatsSettings
from mnemos.connection import connect

log = logging.getLogger("mnemos.control_plane")


async def serve(nats_settings: NatsSettings, settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    nc = await connect(nats_settings, "mnemos-control-plane")
    try:
        async with ControlPlane(nc, nats_settings, settings) as cp:
            stopping = asyncio.ensure_future(stop.wait())
            failing = asyncio.ensure_future(cp.wait_failed())
            await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            failing.cancel()
            # A dead background loop: stop in order, then stop() re-raises it (exit non-zero).
    finally:
        await nc.drain()
