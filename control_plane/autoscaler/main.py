"""``mnemos autoscaler``: act while holding the lease, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from control_plane.autoscaler.config import AutoscalerSettings
from control_plane.autoscaler.service import Autoscaler
from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.tasks import until_stopped_or_failed


async def serve(nats_settings: NatsSettings, settings: AutoscalerSettings, stop: asyncio.Event) -> None:
    nc = await connect(nats_settings, "mnemos-autoscaler")
    try:
        async with Autoscaler(nc, nats_settings, settings) as autoscaler:
            await until_stopped_or_failed(stop, autoscaler.supervisor)
    finally:
        await nc.drain()
