"""Lifecycle guarantees under faults: a worker killed with SIGKILL mid-job, redelivery,
stale dispatch messages, dead-lettering."""

from __future__ import annotations

import os
import signal

import pytest

from mnemos.client import job_spec
from mnemos.messages import WorkerCommand, decode, encode
from tests.conftest import assert_eventually


async def _listed(client, worker_id: str) -> bool:  # noqa: ANN001
    return worker_id in [w.worker_id for w in await client.workers()]


async def _running_on(client, job_id: str, worker_id: str) -> bool:  # noqa: ANN001
    r = await client.get(job_id)
    return r.status == "running" and r.worker_id == worker_id


async def test_sigkilled_worker_job_completes_elsewhere(
    control_plane, start_worker, demo_fn, client, worker_process
) -> None:
    doomed = worker_process("doomed")
    await assert_eventually(lambda: _listed(client, "doomed"), timeout=30)
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[3]))
    await assert_eventually(lambda: _running_on(client, job.job_id, "doomed"), timeout=10)
    await assert_eventually(lambda: _reported(client, "doomed", job.job_id), timeout=5)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    survivor = await start_worker()
    await assert_eventually(lambda: _gone(client, "doomed"), timeout=10, message="dead worker still listed")
    done = await client.wait(job.job_id, timeout=30)
    assert done.status == "completed" and done.worker_id == survivor.worker_id
    assert [a.outcome for a in done.attempts] == ["lost", "completed"]
    assert done.attempts[0].worker_id == "doomed" and done.attempts[0].error.code == "worker_lost"
    assert done.dispatch == 1  # queued again by the control plane, not by redelivery
    assert control_plane.reaper.recovered == 1


async def _reported(client, worker_id: str, job_id: str) -> bool:  # noqa: ANN001
    return any(w.worker_id == worker_id and job_id in w.current_jobs for w in await client.workers())


async def _gone(client, worker_id: str) -> bool:  # noqa: ANN001
    return not await _listed(client, worker_id)


async def test_redelivered_message_is_taken_over_and_the_lost_attempt_recorded(
    control_plane, start_worker, demo_fn, client, worker_process, nc, names
) -> None:
    # A worker that dies before its first heartbeat lists the job: only redelivery saves it.
    survivor = await start_worker(ack_wait_s=3.0)  # creates the consumers with a short ack wait
    await nc.request(names.worker_control_subject(survivor.worker_id), encode(WorkerCommand(command="pause")))
    silent = worker_process("silent", MNEMOS_WORKER_ACK_WAIT_S="3")
    await assert_eventually(lambda: _listed(client, "silent"), timeout=30)
    await control_plane.reaper.stop()  # no fast path: JetStream redelivery alone
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[1]))
    await assert_eventually(lambda: _running_on(client, job.job_id, "silent"), timeout=10)
    os.killpg(silent.pid, signal.SIGKILL)
    await nc.request(names.worker_control_subject(survivor.worker_id), encode(WorkerCommand(command="resume")))
    # the message comes back when its ack wait (3 s) runs out; the survivor takes it over
    spec_done = await client.wait(job.job_id, timeout=40)
    assert spec_done.status == "completed"
    assert [a.outcome for a in spec_done.attempts] == ["lost", "completed"]
    assert spec_done.dispatch == 0


async def test_backpressure_fails_fast_with_queue_full(nats_settings, layout, demo_fn, client, nc) -> None:
    import asyncio

    from control_plane import ControlPlane, ControlPlaneSettings
    from mnemos.errors import QueueFull

    settings = ControlPlaneSettings(max_queued_per_runtime=5, queue_depth_refresh_s=0.05)
    async with ControlPlane(nc, nats_settings, settings):
        accepted = []
        with pytest.raises(QueueFull) as info:
            for i in range(200):  # no worker: the queue only grows
                accepted.append(await client.submit(job_spec("demo-fn:v1", function="add", args=[i, i])))
                await asyncio.sleep(0.01)
        assert 5 <= len(accepted) < 30  # the bound holds within one refresh interval
        assert info.value.code == "queue_full" and info.value.retryable
        assert info.value.details["runtime"] == "python"
        listed = await client.list(status=["queued"], limit=1000)
        assert len(listed.jobs) == len(accepted)  # nothing was half-accepted


async def test_idempotent_submission_returns_the_same_job(control_plane, start_worker, demo_fn, client) -> None:
    import asyncio

    first = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[0.3], idempotency_key="order-42"))
    again = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[0.3], idempotency_key="order-42"))
    assert again.job_id == first.job_id
    await start_worker()
    # two callers waiting on the same key both get the finished job, which ran once
    a, b = await asyncio.gather(
        client.run(job_spec("demo-fn:v1", function="sleep", args=[0.3], idempotency_key="order-43"), timeout=20),
        client.run(job_spec("demo-fn:v1", function="sleep", args=[0.3], idempotency_key="order-43"), timeout=20),
    )
    assert a.job_id == b.job_id and a.status == b.status == "completed" and len(a.attempts) == 1
    done = await client.wait(first.job_id, timeout=20)
    assert len(done.attempts) == 1
    other = await client.submit(job_spec("demo-fn:v1", function="noop", idempotency_key="order-44"))
    assert other.job_id not in (first.job_id, a.job_id)


async def test_idempotency_window_expires(nats_settings, demo_functions_dir) -> None:
    """After the window, the same key makes a new job."""
    import nats as nats_client

    from control_plane import ControlPlane, ControlPlaneSettings
    from mnemos.client import Client
    from mnemos.config import NatsSettings
    from registry import Registry, RegistrySettings
    from tests.conftest import drop_namespace

    settings = NatsSettings(nats_url=nats_settings.nats_url, namespace=nats_settings.namespace + "w")
    nc = await nats_client.connect(settings.servers)
    try:
        async with ControlPlane(nc, settings, ControlPlaneSettings(idempotency_window_s=1.0)):
            reg = Registry(nc.jetstream(), settings.names, RegistrySettings())
            await reg.push(demo_functions_dir, family="demo-fn", version="v1", runtime="python",
                           runtime_config={"entrypoint": "functions.py:noop"})
            client = Client(nc, settings.names)
            spec = job_spec("demo-fn:v1", idempotency_key="k")
            first = await client.submit(spec)
            assert (await client.submit(spec)).job_id == first.job_id

            async def renewed() -> bool:
                return (await client.submit(spec)).job_id != first.job_id

            await assert_eventually(renewed, timeout=5, interval=0.25)
    finally:
        await drop_namespace(nc, settings.names)
        await nc.close()


async def test_a_raced_completion_is_recorded_once_and_counted(
    control_plane, start_worker, demo_fn, client
) -> None:
    """A worker wrongly declared dead keeps running; its late result must not overwrite."""
    slow = await start_worker()
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[1.5]))
    await assert_eventually(lambda: _running_on(client, job.job_id, slow.worker_id), timeout=10)
    await slow._cancel_background("pull")  # it keeps its running job but takes no new ones
    await control_plane.reaper.recover_job(job.job_id, slow.worker_id)  # declared dead
    fast = await start_worker()
    done = await client.wait(job.job_id, timeout=20)
    assert done.status == "completed" and done.worker_id == fast.worker_id
    await assert_eventually(lambda: slow.executor.duplicates == 1, timeout=10)
    final = await client.get(job.job_id)
    assert [a.outcome for a in final.attempts] == ["lost", "completed"]
    assert final.worker_id == fast.worker_id  # the late result did not overwrite


async def test_dead_letter_after_the_last_attempt(
    control_plane, start_worker, demo_fn, client, worker_process, nc, names
) -> None:
    doomed = worker_process("doomed2")
    await assert_eventually(lambda: _listed(client, "doomed2"), timeout=30)
    spec = job_spec("demo-fn:v1", function="sleep", args=[5])
    spec.retry_config = decode(encode({"max_retries": 0}), type(spec.retry_config or _policy()))
    job = await client.submit(spec)
    await assert_eventually(lambda: _running_on(client, job.job_id, "doomed2"), timeout=10)
    await assert_eventually(lambda: _reported(client, "doomed2", job.job_id), timeout=5)
    os.killpg(doomed.pid, signal.SIGKILL)
    done = await client.wait(job.job_id, timeout=20)
    assert done.status == "failed" and done.error.code == "worker_lost"
    assert [a.outcome for a in done.attempts] == ["lost"]
    # Its dispatch message does not stay in the work queue: the next worker to get it acks it.
    await start_worker(ack_wait_s=3.0)

    async def dispatch_empty() -> bool:
        info = await nc.jetstream().stream_info(names.dispatch_stream)
        return info.state.messages == 0

    await assert_eventually(dispatch_empty, timeout=45, interval=0.5)


def _policy():  # noqa: ANN202
    from mnemos.messages import RetryPolicy

    return RetryPolicy()


async def test_vanished_worker_past_the_timeout_ends_the_job_as_timeout(
    control_plane, demo_fn, client, worker_process
) -> None:
    doomed = worker_process("doomed3")
    await assert_eventually(lambda: _listed(client, "doomed3"), timeout=30)
    spec = job_spec("demo-fn:v1", function="sleep", args=[30], timeout_seconds=1.0)
    spec.retry_config = decode(encode({"max_retries": 0}), type(spec.retry_config or _policy()))
    job = await client.submit(spec)
    await assert_eventually(lambda: _reported(client, "doomed3", job.job_id), timeout=10)
    os.killpg(doomed.pid, signal.SIGSTOP)  # frozen: no heartbeats, no timeout enforcement of its own
    try:
        done = await client.wait(job.job_id, timeout=20)
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
    assert done.status == "timeout" and done.error.code == "timeout"
    assert [a.outcome for a in done.attempts] == ["timeout"]


async def test_worker_recycles_after_max_lifetime(control_plane, start_worker, demo_fn, client) -> None:
    """Past its lifetime a worker recycles (checked after each job and, idle, with each
    heartbeat: tests/test_worker_states.py has an idle one)."""
    worker = await start_worker(max_lifetime_s=0.5)
    await assert_eventually(lambda: worker.exit_requested.is_set(), timeout=30)
    assert worker.exit_reason.startswith("recycle: older than")
