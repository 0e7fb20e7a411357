"""``mnemos autoscaler``: act while holding the lease, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from control_plane.autoscaler.config import AutoscalerSettings
from control_plane.autoscaler.service import Autoscaler
from mnemos.config import NatsSettings
from mnemos.connection import connect


async def serve(nats_settings: NatsSettings, settings: AutoscalerSettings, stop: asyncio.Event) -> None:
    nc = await connect(nats_settings, "mnemos-autoscaler")
    try:
        async with Autoscaler(nc, nats_settings, settings) as autoscaler:
            stopping = asyncio.ensure_future(stop.wait())
            failing = asyncio.ensure_future(autoscaler.wait_failed())
            await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            failing.cancel()
    finally:
        await nc.drain()
