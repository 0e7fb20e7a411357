"""``mnemos worker``: run jobs until SIGTERM (drain) or a recycle limit, then exit.

The process exits 0 after a drain (a signal, a ``drain`` command, recycling) and non-zero
when the worker reached ``error`` (it could not connect or start, or a background task
died), so that ``mnemos up`` or the container runtime starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging

from mnemos.config import NatsSettings
from mnemos.connection import connect
from neuron_runtime.config import WorkerSettings
from neuron_runtime.worker import Worker
from registry.config import RegistrySettings

log = logging.getLogger("mnemos.worker")


async def serve(
    nats_settings: NatsSettings,
    settings: WorkerSettings,
    registry_settings: RegistrySettings,
    stop: asyncio.Event,
) -> str:
    """Run one worker; returns why it stopped ("signal", "recycle: ...", "drain requested").
    Raises what put it in ``error`` (after draining, when it had started)."""
    worker = Worker(None, nats_settings, settings, registry_settings)
    nc = await worker.connect(lambda: connect(nats_settings, f"mnemos-worker-{settings.worker_id}"))
    try:
        async with worker:
            stopper = asyncio.create_task(stop.wait())
            exiter = asyncio.create_task(worker.exit_requested.wait())
            await asyncio.wait({stopper, exiter}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            exiter.cancel()
            reason = worker.exit_reason if worker.exit_requested.is_set() else "signal"
            log.info("worker %s draining (%s)", settings.worker_id, reason)
        return reason
    finally:
        await nc.drain()
