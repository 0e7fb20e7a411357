"""A background loop of the control plane that dies is never silent: it is logged with its
name, ``wait_failed`` returns it (``mnemos control-plane`` then stops and exits non-zero),
and ``stop`` re-raises it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import pytest

from control_plane import ControlPlane, ControlPlaneSettings
from control_plane.index import JobIndex
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings


async def test_a_dying_loop_stops_the_control_plane_loudly(
    nats_settings: NatsSettings, layout: Any, demo_fn: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: JobIndex, key: str, value: bytes) -> None:
        raise RuntimeError("index update failed")

    conn = await nats.connect(nats_settings.servers)
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings())
    try:
        await cp.start()
        monkeypatch.setattr(JobIndex, "_apply", broken)
        await Client(conn, nats_settings.names).submit(job_spec("demo-fn:v1", function="noop"))
        err = await asyncio.wait_for(cp.wait_failed(), timeout=30)
        assert isinstance(err, RuntimeError) and "index update failed" in str(err)
        assert any("control-plane-job-index" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        with pytest.raises(RuntimeError, match="index update failed"):
            await cp.stop()
    finally:
        await conn.close()
