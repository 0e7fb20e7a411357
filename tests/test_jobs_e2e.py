"""A job through the real pieces: control plane, worker, registry, over a real nats-server."""

from __future__ import annotations

import asyncio

import pytest

from mnemos.client import job_spec
from mnemos.errors import UnknownModel, UnknownRuntime, ValidationFailed
from mnemos.messages import ResultChunk, ResultFinal
from tests.conftest import assert_eventually


async def test_python_job_runs_end_to_end(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker()
    record = await client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]), timeout=30)
    assert record.status == "completed"
    assert record.output.result == 5
    assert record.worker_id == worker.worker_id
    assert record.attempt == 1
    [attempt] = record.attempts
    assert [p.name for p in attempt.phases] == ["acquired", "loading_model", "running", "completed"]
    assert record.timings.cache_hit is False and record.timings.load_ms > 0

    again = await client.run(job_spec("demo-fn:v1", function="add", args=[4, 4]), timeout=30)
    assert again.output.result == 8
    assert again.timings.cache_hit is True
    assert again.timings.load_ms == 0.0
    assert [p.name for p in again.attempts[0].phases] == ["acquired", "running", "completed"]

    stored = await client.get(again.job_id)
    assert stored.status == "completed" and stored.output.result == 8


async def test_submit_then_wait_and_stream(control_plane, start_worker, demo_fn, client) -> None:
    await start_worker()
    job = await client.submit(job_spec("demo-fn:v1", function="stream_words", args=["a b c"]))
    assert job.status == "queued"
    items = [item async for item in client.stream(job.job_id)]
    chunks = [i for i in items if isinstance(i, ResultChunk)]
    assert [c.text.strip() for c in chunks] == ["a", "b", "c"]
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert isinstance(items[-1], ResultFinal) and items[-1].status == "completed"
    done = await client.wait(job.job_id, timeout=10)
    assert done.status == "completed"


async def test_bad_requests_get_the_error_envelope(control_plane, demo_fn, client) -> None:
    with pytest.raises(UnknownModel):
        await client.submit(job_spec("nope:v1", prompt="x"))
    with pytest.raises(UnknownRuntime):
        await client.submit(job_spec("demo-fn:v1", runtime="tensorflow"))
    with pytest.raises(ValidationFailed):
        await client.submit(job_spec("demo-fn:v1", runtime="transformers", prompt="x"))
    with pytest.raises(ValidationFailed):
        job_spec("demo-fn:v1", temperature=3.0)


async def test_failed_function_records_the_error(control_plane, start_worker, demo_fn, client) -> None:
    await start_worker()
    record = await client.run(job_spec("demo-fn:v1", function="fail", args=["kaput"]), timeout=30)
    assert record.status == "failed"
    assert record.error.code == "execution_error"
    assert "kaput" in record.error.message
    assert record.attempts[0].outcome == "failed"


async def test_cancel_queued_job_is_never_run(control_plane, start_worker, demo_fn, client) -> None:
    job = await client.submit(job_spec("demo-fn:v1", function="add", args=[1, 1]))
    cancelled = await client.cancel(job.job_id)
    assert cancelled.status == "cancelled"
    info = await control_plane.js.stream_info(control_plane.names.dispatch_stream)
    assert info.state.messages == 0  # its dispatch message is gone: nothing left to pull
    worker = await start_worker()
    # A later job on the same queue runs; the cancelled one is dropped, never executed.
    after = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 2]), timeout=30)
    assert after.status == "completed"
    final = await client.get(job.job_id)
    assert final.status == "cancelled" and final.attempt == 0 and final.attempts == []
    assert worker.executor.completed == 1


async def test_strict_priority_with_one_worker(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(max_concurrent_jobs=1)
    blocker = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[0.5], priority=5))
    await assert_eventually(lambda: blocker.job_id in worker.executor.running)
    jobs = {}
    for prio in (3, 9, 5):
        jobs[prio] = await client.submit(job_spec("demo-fn:v1", function="noop", priority=prio))
    done = [await client.wait(jobs[p].job_id, timeout=20) for p in (3, 9, 5)]
    started = {r.spec.priority: r.attempts[0].started_at for r in done}
    assert started[9] < started[5] < started[3]


async def test_idle_worker_starts_new_job_without_polling(control_plane, start_worker, demo_fn, client) -> None:
    await start_worker(idle_recheck_s=60.0)
    await client.run(job_spec("demo-fn:v1", function="noop"), timeout=30)  # warm the model
    await asyncio.sleep(0.3)  # the worker is idle, waiting on its doorbell
    record = await client.run(job_spec("demo-fn:v1", function="noop"), timeout=5)
    assert record.status == "completed"
    # Polling would take up to the 60 s recheck; the doorbell takes milliseconds. The bound
    # separates the two with room for a busy machine (speed itself: loadtest bench).
    assert record.timings.queue_ms < 20_000, record.timings


async def test_waiting_run_job_gets_a_record_and_can_be_cancelled(
    nats_settings, layout, demo_fn, client, nc
) -> None:
    """A jobs.run job is written by its claim; unclaimed after the delay, the control plane
    writes it as queued, so it is listed and cancellable (and the caller hears of it)."""
    from control_plane import ControlPlane, ControlPlaneSettings

    async with ControlPlane(nc, nats_settings, ControlPlaneSettings(run_record_delay_s=0.2)):
        waiting = asyncio.create_task(client.run(job_spec("demo-fn:v1", function="noop"), timeout=20))
        async def queued_jobs():
            return (await client.list(status=["queued"])).jobs

        [queued] = await assert_eventually(queued_jobs, timeout=5)
        cancelled = await client.cancel(queued.job_id)
        assert cancelled.status == "cancelled"
        answer = await asyncio.wait_for(waiting, timeout=5)
        assert answer.job_id == queued.job_id and answer.status == "cancelled"


async def test_run_job_claimed_in_time_needs_no_control_plane_record(
    control_plane, start_worker, demo_fn, client
) -> None:
    await start_worker()
    done = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 2]), timeout=30)
    assert done.status == "completed"
    await asyncio.sleep(1.5)  # past the deferred-record delay: nothing overwrites it
    again = await client.get(done.job_id)
    assert again.status == "completed" and again.output.result == 3
