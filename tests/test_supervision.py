"""A background task that dies is never silent: it is logged with its name and its process
exits non-zero. The control plane: ``wait_failed`` returns it (``mnemos control-plane``
then stops and exits non-zero) and ``stop`` re-raises it. The gateway: ``serve`` raises it.
A worker: it publishes status ``error`` and its process exits non-zero."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from control_plane import ControlPlane, ControlPlaneSettings
from control_plane.deferred import DeferredRecords
from control_plane.gateway.config import GatewaySettings
from control_plane.gateway.deps import GatewayState
from control_plane.index import JobIndex
from mnemos.asgi import AsgiServer
from mnemos.catalog import ModelCatalog
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.embedded import die_with_parent
from mnemos.messages import WorkerRecord, decode
from mnemos.tasks import BackgroundTaskDied
from tests.conftest import assert_eventually


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


async def test_a_dying_catalog_watch_stops_the_control_plane(
    nats_settings: NatsSettings, layout: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: ModelCatalog) -> None:
        raise RuntimeError("alias index broken")

    conn = await nats.connect(nats_settings.servers)
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings())
    try:
        await cp.start()
        monkeypatch.setattr(ModelCatalog, "_rebuild_aliases", broken)
        await layout.models.put("some-model.v1", b"{}")  # the watch sees a change
        err = await asyncio.wait_for(cp.wait_failed(), timeout=30)
        assert "alias index broken" in str(err)
        assert cp.supervisor.failed_task == "control-plane-model-catalog"
        assert any("control-plane-model-catalog" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
        with pytest.raises(RuntimeError, match="alias index broken"):
            await cp.stop()
    finally:
        await conn.close()


async def test_a_dying_deferred_records_loop_stops_the_control_plane(
    nats_settings: NatsSettings, layout: Any, demo_fn: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: DeferredRecords, consumer: str) -> int:
        raise RuntimeError("consumer info broken")

    monkeypatch.setattr(DeferredRecords, "_delivered", broken)
    conn = await nats.connect(nats_settings.servers)
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(run_record_delay_s=0.05))
    stop = asyncio.Event()
    try:
        await cp.start()
        # A run-job nobody claims: the loop asks who was delivered what, and dies.
        waiting = asyncio.ensure_future(Client(conn, nats_settings.names).run(job_spec("demo-fn:v1", function="noop"),
                                                                             timeout=30))
        err = await asyncio.wait_for(cp.wait_failed(), timeout=30)
        assert "consumer info broken" in str(err) and cp.supervisor.failed_task == "control-plane-deferred-records"
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        with pytest.raises(RuntimeError, match="consumer info broken"):
            await cp.stop()
    finally:
        stop.set()
        await conn.close()


async def test_control_plane_main_exits_with_the_error_of_a_dead_loop(
    nats_settings: NatsSettings, layout: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mnemos control-plane`` returns from ``serve`` only by raising it (exit non-zero)."""

    def broken(self: ModelCatalog) -> None:
        raise RuntimeError("alias index broken")

    from control_plane.main import serve

    running = asyncio.ensure_future(serve(nats_settings, ControlPlaneSettings(), asyncio.Event()))
    conn = await nats.connect(nats_settings.servers)
    try:
        await assert_eventually(lambda: _answers(conn, nats_settings), timeout=30, message="no control plane")
        monkeypatch.setattr(ModelCatalog, "_rebuild_aliases", broken)
        await layout.models.put("some-model.v1", b"{}")
        with pytest.raises(RuntimeError, match="alias index broken"):
            await asyncio.wait_for(running, timeout=60)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await conn.close()


async def _answers(conn: Any, nats_settings: NatsSettings) -> bool:
    try:
        await Client(conn, nats_settings.names).workers()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


# ---------------------------------------------------------------------------- gateway


def _capture_gateway(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Keep the server and state that ``mnemos gateway``'s ``serve`` builds."""
    import control_plane.gateway.main as gateway_main

    built: dict[str, Any] = {}
    real = gateway_main._build

    def build(nats_settings: NatsSettings, settings: GatewaySettings) -> tuple[AsgiServer, GatewayState]:
        built["server"], built["state"] = real(nats_settings, settings)
        return built["server"], built["state"]

    monkeypatch.setattr(gateway_main, "_build", build)
    return built


async def test_a_dying_gateway_task_makes_the_gateway_exit_with_it(
    nats_settings: NatsSettings, layout: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from control_plane.gateway.main import serve

    built = _capture_gateway(monkeypatch)
    stop = asyncio.Event()
    running = asyncio.ensure_future(serve(nats_settings, GatewaySettings(host="127.0.0.1", port=0), stop))
    try:
        await assert_eventually(lambda: "server" in built and built["server"].started, timeout=30)

        async def loop() -> None:
            raise RuntimeError("gateway loop failed")

        built["state"].supervisor.spawn("probe-loop", loop())
        with pytest.raises(RuntimeError, match="gateway loop failed"):
            await asyncio.wait_for(running, timeout=30)
        assert any("gateway-probe-loop" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        assert not built["server"].started or built["server"]._task is None  # it stopped serving
    finally:
        stop.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_gateway_whose_http_server_stops_by_itself_exits_non_zero(
    nats_settings: NatsSettings, layout: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    from control_plane.gateway.main import serve

    built = _capture_gateway(monkeypatch)
    real_tick = uvicorn.Server.on_tick
    ended = asyncio.Event()

    async def on_tick(self: uvicorn.Server, counter: int) -> bool:
        gateway = built.get("server")
        if ended.is_set() and gateway is not None and self is gateway._server:
            return True  # uvicorn's main loop ends as if it had been told to exit
        return await real_tick(self, counter)

    monkeypatch.setattr(uvicorn.Server, "on_tick", on_tick)
    stop = asyncio.Event()
    running = asyncio.ensure_future(serve(nats_settings, GatewaySettings(host="127.0.0.1", port=0), stop))
    try:
        await assert_eventually(lambda: "server" in built and built["server"].started, timeout=30)
        ended.set()
        with pytest.raises(BackgroundTaskDied, match="stopped by itself"):
            await asyncio.wait_for(running, timeout=30)
    finally:
        stop.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_failed_gateway_background_task_is_logged_by_name_and_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from control_plane.gateway.auth import ApiKeys
    from control_plane.gateway.metrics import GatewayMetrics

    settings = GatewaySettings()
    state = GatewayState(settings=settings, keys=ApiKeys.from_settings(settings), metrics=GatewayMetrics())

    async def cancel() -> None:
        raise ConnectionError("NATS went away")

    state.background("cancel-01JOB", cancel())
    await state.drain(timeout=5)
    assert not state.supervisor.failed.is_set()
    [logged] = [r for r in caplog.records if "gateway-cancel-01JOB" in r.getMessage()]
    assert logged.levelno == logging.WARNING and "NATS went away" in logged.getMessage()


# ---------------------------------------------------------------------------- worker

def _popen(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)


_BROKEN_WORKER = """
import sys

from neuron_runtime.executor import Executor


async def touch_all(self):
    raise RuntimeError("in-progress touch failed")


Executor.touch_all = touch_all
from launchers.cli import main

sys.argv = ["mnemos", "worker"]
main()
"""


async def test_a_worker_whose_loop_dies_publishes_error_and_exits_non_zero(
    nats_settings: NatsSettings, layout: Any, tmp_path: Path,
) -> None:
    """A real ``mnemos worker`` process: its in-progress loop dies; it says so in its record
    (status ``error``, the reason), which it leaves to expire, and exits non-zero."""
    worker_id = "broken-" + uuid.uuid4().hex[:6]
    env = dict(os.environ, MNEMOS_NATS_URL=nats_settings.nats_url, MNEMOS_NAMESPACE=nats_settings.namespace,
               MNEMOS_WORKER_ID=worker_id, MNEMOS_WORKER_RUNTIMES="python", MNEMOS_WORKER_ACK_WAIT_S="3",
               MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="5", MNEMOS_WORKER_CACHE_DIR=str(tmp_path / "cache"),
               MNEMOS_LOG_LEVEL="INFO")
    log_path = tmp_path / "worker.log"
    proc = _popen([sys.executable, "-c", _BROKEN_WORKER], env, log_path)
    try:
        rc = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text()
    assert rc != 0, text
    assert f"background task worker-{worker_id}-in-progress died" in text
    record = decode((await layout.workers.get(worker_id)).value or b"", WorkerRecord)  # it expires in 15 s
    assert record.status == "error"
    assert record.error is not None and "in-progress" in record.error and "in-progress touch failed" in record.error


async def test_a_loop_ends_even_when_wait_for_swallowed_its_cancellation() -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the result instead of raising when the
    cancellation arrives as the awaited future completes (CPython gh-86296); a periodic
    loop pausing with ``mnemos.tasks.next_round`` still ends at its next pause, where one pausing
    with ``asyncio.sleep`` would go on (a stopped worker's heartbeat did)."""
    from mnemos.tasks import cancel_and_wait, next_round

    loop = asyncio.get_running_loop()
    rounds = 0
    waiting: asyncio.Future[None] = loop.create_future()
    answer: asyncio.Future[int] = loop.create_future()

    async def heartbeat() -> None:
        nonlocal rounds
        while True:
            if rounds == 0:
                waiting.set_result(None)
                await asyncio.wait_for(answer, timeout=30)  # a JetStream publish's ack
            rounds += 1
            await next_round(0.01)

    task = asyncio.create_task(heartbeat())
    await waiting
    answer.set_result(1)  # the ack arrives ...
    task.cancel()  # ... as the loop is stopped
    await cancel_and_wait(task, timeout=5)
    assert task.cancelled() and rounds <= 1
