"""A worker's status as its record in ``mnemos_workers`` shows it: each state change is
written once, in order (registering -> starting -> idle -> ... -> draining -> stopped, then
the record is deleted; ``error`` with its reason, left to expire), and an idle worker
recycles at its max lifetime without waiting for a job."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.kv import KeyValue

from mnemos.catalog import ModelCatalog
from mnemos.config import NatsSettings
from mnemos.messages import WorkerCommand, WorkerRecord, decode, encode
from neuron_runtime import Worker, WorkerSettings
from neuron_runtime.executor import Executor
from registry.config import RegistrySettings
from tests.conftest import assert_eventually


class RecordWatch:
    """Every write of one worker's record, in order: its status, or ``"deleted"``."""

    def __init__(self, kv: KeyValue, worker_id: str) -> None:
        self.kv = kv
        self.worker_id = worker_id
        self.seen: list[str] = []
        self.records: list[WorkerRecord] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "RecordWatch":
        watcher = await self.kv.watch(self.worker_id)
        self._task = asyncio.create_task(self._follow(watcher))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation is None and entry.value:
                    record = decode(entry.value, WorkerRecord)
                    self.records.append(record)
                    self.seen.append(record.status)
                else:
                    self.seen.append("deleted")
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def changes(self) -> list[str]:
        """The statuses seen, a heartbeat repeating the last one left out."""
        return [s for i, s in enumerate(self.seen) if i == 0 or self.seen[i - 1] != s]


async def _command(nc: Any, nats_settings: NatsSettings, worker: Worker, command: str) -> None:
    subject = nats_settings.names.worker_control_subject(worker.worker_id)
    await nc.request(subject, encode(WorkerCommand(command=command)), timeout=5)  # type: ignore[arg-type]


def _settings(tmp_path: Path, **overrides: Any) -> WorkerSettings:
    options: dict[str, Any] = dict(worker_id=f"w-{uuid.uuid4().hex[:6]}", runtimes=["python"],
                                   heartbeat_interval_s=1.0, cache_dir=tmp_path / "cache", drain_timeout_s=5.0)
    options.update(overrides)
    return WorkerSettings(**options)


async def test_a_worker_writes_each_state_of_its_life_once_in_order(
    nats_settings: NatsSettings, layout: Any, nc: Any, tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, heartbeat_interval_s=300.0)  # no heartbeat repeats a state here
    async with RecordWatch(layout.workers, settings.worker_id) as watch:
        conn = await nats.connect(nats_settings.servers)
        try:
            worker = Worker(conn, nats_settings, settings)
            assert worker.status == "initializing"
            await worker.start()
            await _command(nc, nats_settings, worker, "pause")
            await assert_eventually(lambda: watch.seen[-1:] == ["paused"], message="paused not written")
            await _command(nc, nats_settings, worker, "resume")
            await assert_eventually(lambda: watch.seen[-1:] == ["idle"], message="resumed not written")
            await worker.drain()
        finally:
            await conn.close()
        await assert_eventually(lambda: watch.seen[-1:] == ["deleted"], message="not deregistered")
    assert watch.changes() == ["registering", "starting", "idle", "paused", "idle", "draining", "stopped", "deleted"]
    assert watch.seen == watch.changes()  # each change written once
    assert all(r.error is None for r in watch.records)


async def test_a_dying_loop_is_written_as_error_with_its_reason_and_left_to_expire(
    nats_settings: NatsSettings, layout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mnemos worker``'s ``serve``: the in-progress loop dies; the record says ``error``
    and why, the worker drains, and ``serve`` raises (the process exits non-zero)."""
    from neuron_runtime.main import serve

    async def broken(self: Executor) -> None:
        raise RuntimeError("in-progress touch failed")

    monkeypatch.setattr(Executor, "touch_all", broken)
    settings = _settings(tmp_path, ack_wait_s=3.0)
    async with RecordWatch(layout.workers, settings.worker_id) as watch:
        with pytest.raises(RuntimeError, match="in-progress touch failed"):
            await asyncio.wait_for(serve(nats_settings, settings, RegistrySettings(), asyncio.Event()), timeout=60)
        await assert_eventually(lambda: watch.records and watch.records[-1].status == "error")
    assert watch.changes() == ["registering", "starting", "idle", "error"]
    reason = watch.records[-1].error
    assert reason is not None and f"worker-{settings.worker_id}-in-progress" in reason and "touch failed" in reason
    entry = await layout.workers.get(settings.worker_id)  # not deregistered: it expires
    assert decode(entry.value, WorkerRecord).status == "error"


async def test_a_failed_start_is_written_as_error_and_raised(
    nats_settings: NatsSettings, layout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: ModelCatalog, supervisor: Any) -> None:
        raise ConnectionError("the models bucket cannot be watched")

    monkeypatch.setattr(ModelCatalog, "start", broken)
    settings = _settings(tmp_path)
    async with RecordWatch(layout.workers, settings.worker_id) as watch:
        conn = await nats.connect(nats_settings.servers)
        try:
            worker = Worker(conn, nats_settings, settings)
            with pytest.raises(ConnectionError, match="cannot be watched"):
                await worker.start()
            await worker.drain()  # nothing more to do; no error raised twice
        finally:
            await conn.close()
        await assert_eventually(lambda: watch.seen[-1:] == ["error"])
    assert watch.changes() == ["registering", "error"]
    reason = watch.records[-1].error
    assert reason is not None and "registering" in reason and "cannot be watched" in reason


async def test_an_idle_worker_recycles_at_its_max_lifetime(
    nats_settings: NatsSettings, layout: Any, tmp_path: Path,
) -> None:
    """No job ever arrives: the heartbeat finds it past ``max_lifetime_s``; it drains and
    ``serve`` returns its reason (the process exits 0 and is started afresh)."""
    from neuron_runtime.main import serve

    settings = _settings(tmp_path, max_lifetime_s=0.5)
    async with RecordWatch(layout.workers, settings.worker_id) as watch:
        reason = await asyncio.wait_for(serve(nats_settings, settings, RegistrySettings(), asyncio.Event()),
                                        timeout=30)
        await assert_eventually(lambda: watch.seen[-1:] == ["deleted"], message="not deregistered")
    assert reason == "recycle: older than 0.5s"
    assert watch.changes() == ["registering", "starting", "idle", "draining", "stopped", "deleted"]
    assert watch.records[-1].jobs_completed == 0
