"""``mnemos control-plane``: serve until SIGINT/SIGTERM, then stop in order."""

from __future__ import annotations

import asyncio
import logging

from control_plane.config import ControlPlaneSettings
from control_plane.service import ControlPlane
from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.tasks import until_stopped_or_failed

log = logging.getLogger("mnemos.control_plane")


async def serve(nats_settings: NatsSettings, settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    nc = await connect(nats_settings, "mnemos-control-plane")
    try:
        async with ControlPlane(nc, nats_settings, settings) as cp:
            await until_stopped_or_failed(stop, cp.supervisor)
    finally:
        await nc.drain()
