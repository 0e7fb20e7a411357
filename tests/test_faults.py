"""Faults a black-box probe found: a cancel on a frozen worker, a frozen worker's deadline,
jobs claimed after a dead worker's last heartbeat, and ``pause``."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from control_plane import ControlPlane, ControlPlaneSettings
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.messages import JobRecord, RetryPolicy, WorkerCommand, WorkerRecord, decode, encode
from mnemos.names import Names
from tests.conftest import assert_eventually


@pytest.fixture
async def quick_control_plane(nats_settings: NatsSettings, layout: Any) -> AsyncIterator[ControlPlane]:
    """A control plane that times out a second after a job's deadline and confirms a cancel
    itself after a second."""
    conn = await nats.connect(nats_settings.servers, name="pytest-quick-cp")
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(timeout_grace_s=1.0, cancel_confirm_s=1.0))
    await cp.start()
    yield cp
    await cp.stop()
    await conn.close()


async def _running_on(client: Client, job_id: str, worker_id: str) -> bool:
    r = await client.get(job_id)
    return r.status == "running" and r.worker_id == worker_id


async def _status(client: Client, job_id: str, *statuses: str) -> JobRecord | None:
    r = await client.get(job_id)
    return r if r.status in statuses else None


async def _quiet_again(client: Client, worker_id: str, job_id: str) -> bool:
    """The (woken) worker heartbeats again and no longer holds the job."""
    return any(w.worker_id == worker_id and job_id not in w.current_jobs for w in await client.workers())


async def _warm(client: Client, worker_id: str) -> None:
    """Run one job on the worker so its functions are loaded (a load re-advertises the record)."""
    await assert_eventually(lambda: _listed(client, worker_id), timeout=30)
    done = await client.run(job_spec("demo-fn:v1", function="noop"), timeout=30)
    assert done.status == "completed" and done.worker_id == worker_id


async def _listed(client: Client, worker_id: str) -> bool:
    return worker_id in [w.worker_id for w in await client.workers()]


async def test_a_cancelled_job_on_a_frozen_worker_never_ends_completed(
    control_plane: Any, demo_fn: Any, client: Client, worker_process: Any
) -> None:
    frozen = worker_process("frozen")
    await _warm(client, "frozen")
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[3]))
    await assert_eventually(lambda: _running_on(client, job.job_id, "frozen"), timeout=10)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        assert (await client.cancel(job.job_id)).status == "cancelling"
        done = await assert_eventually(lambda: _status(client, job.job_id, "cancelled", "completed"), timeout=30)
        assert done.status == "cancelled"  # confirmed while the worker is frozen
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Awake, the worker finishes its sleep (the 3 s passed while it was stopped): dropped.
    await assert_eventually(lambda: _quiet_again(client, "frozen", job.job_id), timeout=30)
    final = await client.get(job.job_id)
    assert final.status == "cancelled" and final.output is None
    assert final.attempts[-1].outcome in ("cancelled", "lost")


async def test_an_unconfirmed_cancel_is_confirmed_by_the_control_plane(
    quick_control_plane: ControlPlane, demo_fn: Any, client: Client, worker_process: Any
) -> None:
    # Heartbeats every 30 s: the worker is not declared dead during this test.
    frozen = worker_process("frozen-long", MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="30")
    await _warm(client, "frozen-long")
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[3]))
    await assert_eventually(lambda: _running_on(client, job.job_id, "frozen-long"), timeout=10)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        await client.cancel(job.job_id)
        done = await assert_eventually(lambda: _status(client, job.job_id, "cancelled", "completed"), timeout=30)
        assert done.status == "cancelled" and done.attempts[-1].outcome == "cancelled"
        assert quick_control_plane.reaper is not None and quick_control_plane.reaper.cancels_confirmed == 1
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    await assert_eventually(lambda: _quiet_again(client, "frozen-long", job.job_id), timeout=60)
    assert (await client.get(job.job_id)).status == "cancelled"


async def test_a_frozen_workers_job_times_out_on_time(
    quick_control_plane: ControlPlane, demo_fn: Any, client: Client, worker_process: Any
) -> None:
    frozen = worker_process("frozen-deadline", MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="30")
    await _warm(client, "frozen-deadline")
    spec = job_spec("demo-fn:v1", function="sleep", args=[20], timeout_seconds=2)
    spec.retry_config = RetryPolicy(max_retries=0)
    job = await client.submit(spec)
    await assert_eventually(lambda: _running_on(client, job.job_id, "frozen-deadline"), timeout=10)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        done = await assert_eventually(lambda: _status(client, job.job_id, "timeout", "completed"), timeout=30)
        assert done.status == "timeout" and done.error is not None and done.error.code == "timeout"
        assert done.attempts[-1].outcome == "timeout"
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    await assert_eventually(lambda: _quiet_again(client, "frozen-deadline", job.job_id), timeout=60)
    assert (await client.get(job.job_id)).status == "timeout"


async def test_every_job_of_a_dead_worker_is_requeued_at_once(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, worker_process: Any, nc: Any,
    names: Names,
) -> None:
    """Jobs the worker claimed after its last heartbeat are recovered too, by the control
    plane (a new dispatch generation), long before JetStream would redeliver them."""
    doomed = worker_process("doomed-all", MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="3", MNEMOS_WORKER_ACK_WAIT_S="300",
                            MNEMOS_WORKER_MAX_CONCURRENT_JOBS="4")
    await _warm(client, "doomed-all")
    beats: asyncio.Queue[WorkerRecord] = asyncio.Queue()

    async def on_beat(msg: Any) -> None:
        await beats.put(decode(msg.data, WorkerRecord))

    sub = await nc.subscribe(names.heartbeat_subject("doomed-all"), cb=on_beat)
    try:
        await asyncio.wait_for(beats.get(), timeout=30)  # right after a heartbeat: the next is 3 s away
        jobs = [await client.submit(job_spec("demo-fn:v1", function="sleep", args=[5])) for _ in range(4)]
        for job in jobs:
            await assert_eventually(lambda j=job: _running_on(client, j.job_id, "doomed-all"), timeout=10)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
    finally:
        await sub.unsubscribe()
    survivor = await start_worker(runtimes=["python"])
    for job in jobs:
        done = await client.wait(job.job_id, timeout=60)  # far below the 300 s ack wait
        assert done.status == "completed" and done.worker_id == survivor.worker_id
        assert [a.outcome for a in done.attempts] == ["lost", "completed"]
        assert done.dispatch == 1  # queued again by the control plane, not redelivered


async def test_a_paused_worker_takes_no_job_after_its_reply(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, nc: Any, names: Names
) -> None:
    paused = await start_worker(runtimes=["python"], max_concurrent_jobs=4)
    for trial in range(3):
        busy = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[1.5]))
        await assert_eventually(lambda b=busy: _running_on(client, b.job_id, paused.worker_id), timeout=10)
        reply = await nc.request(names.worker_control_subject(paused.worker_id),
                                 encode(WorkerCommand(command="pause")), timeout=5)
        assert decode(reply.data, WorkerRecord).status == "paused"
        jobs = [await client.submit(job_spec("demo-fn:v1", function="add", args=[trial, i])) for i in range(10)]
        other = await start_worker(runtimes=["python"], max_concurrent_jobs=4)
        for job in jobs:
            done = await client.wait(job.job_id, timeout=30)
            assert done.status == "completed" and done.worker_id == other.worker_id, done.worker_id
        assert (await client.wait(busy.job_id, timeout=30)).worker_id == paused.worker_id  # it kept running
        await other.drain()
        await nc.request(names.worker_control_subject(paused.worker_id), encode(WorkerCommand(command="resume")),
                         timeout=5)


async def test_a_job_queued_again_without_its_message_still_runs(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, nc: Any, names: Names
) -> None:
    """A control plane that dies between recording "queued again" and publishing the new
    dispatch message (the chaos run's lost jobs) leaves a record with no message: a sweep
    sends it again (the stream drops it when the first one is there)."""
    from control_plane.reaper import ReaperTimings

    control_plane.reaper.timings = ReaperTimings(requeue_check_s=0.5)
    job = await client.submit(job_spec("demo-fn:v1", function="add", args=[20, 22]))
    assert job.queued_seq is not None
    await nc.jetstream().delete_msg(names.dispatch_stream, job.queued_seq)  # the message never got out

    def queued_again(rec: JobRecord) -> JobRecord:
        rec.dispatch += 1  # what the reaper records before it publishes
        return rec

    await control_plane.jobs.mutate(job.job_id, queued_again)
    worker = await start_worker(runtimes=["python"])
    done = await client.wait(job.job_id, timeout=30)
    assert done.status == "completed" and done.output is not None and done.output.result == 42
    assert done.worker_id == worker.worker_id and done.dispatch == 1
    assert control_plane.reaper.repaired == 1


async def test_a_message_whose_record_is_gone_is_dropped_not_redelivered_forever(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, nc: Any, names: Names
) -> None:
    from mnemos.messages import JobSpec, new_job_id, utcnow

    await start_worker(runtimes=["python"], ack_wait_s=3.0)
    now = utcnow()
    ghost = JobRecord(job_id=new_job_id(), status="queued", runtime="python", created_at=now, updated_at=now,
                      spec=decode(encode({"model": {"family": "demo-fn", "version": "v1"}}), JobSpec))
    js = nc.jetstream()
    # Queued at revision 7 of a record that has expired since.
    await js.publish(names.dispatch_subject("python", 5, "demo-fn", "v1"),
                     encode({"type": "io.mnemos.v1.dispatch", "record": ghost, "revision": 7}))

    async def drained() -> bool:
        return (await js.stream_info(names.dispatch_stream)).state.messages == 0

    await assert_eventually(drained, timeout=20, message="the orphaned message stayed in the stream")
    done = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 1]), timeout=30)
    assert done.status == "completed"
