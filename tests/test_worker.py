"""The worker against a real nats-server: registration, heartbeats, runtimes, warm cache,
in-progress acks, drain, cancel, timeouts and retries."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from mnemos.client import job_spec
from mnemos.messages import ResultChunk, ResultFinal, WorkerCommand, WorkerRecord, decode, encode
from tests.conftest import assert_eventually


async def test_worker_registers_and_heartbeats(control_plane, start_worker, client, nc, names) -> None:
    beats: list[WorkerRecord] = []

    async def on_beat(msg) -> None:  # noqa: ANN001
        beats.append(decode(msg.data, WorkerRecord))

    sub = await nc.subscribe(names.heartbeat_all, cb=on_beat)
    worker = await start_worker(heartbeat_interval_s=1.0)
    [listed] = await client.workers()
    assert listed.worker_id == worker.worker_id
    assert listed.status == "idle"
    assert set(listed.runtimes) == {"python", "transformers", "pytorch"}
    res = listed.resources
    assert res is not None and res.cpu_count >= 1 and res.memory_total_mb > 0 and res.disk_total_gb > 0
    assert res.gpus == []  # no GPU here: NVML absent is normal
    await assert_eventually(lambda: len(beats) >= 2, timeout=5)
    assert all(b.worker_id == worker.worker_id for b in beats)
    first = (await client.workers())[0].last_heartbeat
    await assert_eventually(
        lambda: _later(client, first), timeout=5, message="KV record not refreshed by heartbeats"
    )
    await sub.unsubscribe()


async def _later(client, first) -> bool:  # noqa: ANN001
    return (await client.workers())[0].last_heartbeat > first


async def test_worker_record_expires_when_heartbeats_stop(control_plane, start_worker, client) -> None:
    worker = await start_worker(heartbeat_interval_s=1.0)
    assert [w.worker_id for w in await client.workers()] == [worker.worker_id]
    await worker._cancel_background("heartbeat")  # a frozen worker: no more heartbeats
    # TTL is three intervals: gone within ~3 s (+1 s of whole-second TTL rounding).
    await assert_eventually(lambda: _none(client), timeout=6, message="worker still listed")


async def _none(client) -> bool:  # noqa: ANN001
    return not await client.workers()


async def test_job_for_a_missing_runtime_waits_for_a_worker_that_has_it(
    control_plane, start_worker, demo_fn, demo_model, client
) -> None:
    python_only = await start_worker(runtimes=["python"])
    job = await client.submit(job_spec("demo-gpt2:v1", prompt="hi", max_tokens=3))
    ok = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 1]), timeout=10)
    assert ok.worker_id == python_only.worker_id
    await asyncio.sleep(0.5)
    assert (await client.get(job.job_id)).status == "queued"  # never taken by the python worker
    text_worker = await start_worker(runtimes=["transformers"])
    done = await client.wait(job.job_id, timeout=60)
    assert done.status == "completed" and done.worker_id == text_worker.worker_id


async def test_transformers_job_streams_tokens_and_second_job_is_warm(
    control_plane, start_worker, demo_model, client
) -> None:
    worker = await start_worker(runtimes=["transformers"], stream_interval_ms=0)
    spec = job_spec("demo-gpt2:v1", prompt="hello world", max_tokens=12, temperature=0)
    job = await client.submit(spec)
    items = [i async for i in client.stream(job.job_id)]
    chunks = [i for i in items if isinstance(i, ResultChunk)]
    final = items[-1]
    assert isinstance(final, ResultFinal) and final.status == "completed"
    record = await client.get(job.job_id)
    assert "".join(c.text for c in chunks) == record.output.result
    assert len(chunks) >= 6  # token by token (a few tokens may decode to nothing alone)
    assert record.output.metadata["completion_tokens"] == 12
    assert [p.name for p in record.attempts[0].phases] == [
        "acquired", "loading_model", "running", "streaming", "completed"]
    assert record.timings.cache_hit is False and record.timings.disk_cache_hit is False
    assert record.timings.load_ms > 0 and record.timings.first_token_ms is not None

    again = await client.run(spec, timeout=60)
    assert again.output.result == record.output.result  # greedy: same text
    assert again.timings.cache_hit is True and again.timings.load_ms == 0.0
    await assert_eventually(lambda: _loaded(client, "demo-gpt2:v1"), timeout=5)
    assert worker.pool.hits >= 1


async def _loaded(client, name: str) -> bool:  # noqa: ANN001
    return name in (await client.workers())[0].loaded_models


async def test_restarted_worker_reuses_its_disk_cache(
    control_plane, start_worker, demo_model, client, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    first = await start_worker(runtimes=["transformers"], cache_dir=cache)
    spec = job_spec("demo-gpt2:v1", prompt="x", max_tokens=2)
    assert (await client.run(spec, timeout=60)).timings.disk_cache_hit is False
    await first.drain()
    await start_worker(runtimes=["transformers"], cache_dir=cache)
    record = await client.run(spec, timeout=60)
    assert record.timings.cache_hit is False and record.timings.disk_cache_hit is True


async def test_pytorch_torchscript_job(control_plane, start_worker, registry, client, tmp_path: Path) -> None:
    import torch

    from registry.demo import build_demo_torchscript

    model_dir = build_demo_torchscript(tmp_path / "ts")
    await registry.push(model_dir, family="demo-linear", version="v1", runtime="pytorch",
                        runtime_config={"device": "cpu"})
    await start_worker(runtimes=["pytorch"])
    x = [[1.0, 2.0, 3.0, 4.0]]
    record = await client.run(job_spec("demo-linear:v1", args=[x]), timeout=60)
    assert record.status == "completed", record.error
    expected = torch.jit.load(str(model_dir / "model.pt"))(torch.tensor(x)).tolist()
    assert record.output.result[0] == pytest.approx(expected[0])


async def test_running_job_is_marked_in_progress(control_plane, start_worker, demo_fn, client) -> None:
    # ack_wait 3 s, the job takes 4.5 s: without "in progress" it would be redelivered.
    await start_worker(ack_wait_s=3.0)
    await start_worker(ack_wait_s=3.0)
    record = await client.run(job_spec("demo-fn:v1", function="sleep", args=[4.5]), timeout=30)
    assert record.status == "completed"
    assert record.attempt == 1 and len(record.attempts) == 1


async def test_drain_finishes_in_flight_jobs_and_deregisters(
    control_plane, start_worker, demo_fn, client
) -> None:
    worker = await start_worker(drain_timeout_s=10.0)
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[1.0]))
    await assert_eventually(lambda: job.job_id in worker.executor.running)
    await worker.drain()
    done = await client.get(job.job_id)
    assert done.status == "completed" and done.attempt == 1
    assert await client.workers() == []


async def test_drain_timeout_hands_jobs_back(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(drain_timeout_s=0.3)
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[3.0]))
    await assert_eventually(lambda: job.job_id in worker.executor.running)
    await worker.drain()
    handed = await client.get(job.job_id)
    assert handed.status == "queued"
    assert handed.attempts[-1].outcome == "handed_back"
    other = await start_worker()
    done = await client.wait(job.job_id, timeout=30)
    assert done.status == "completed" and done.worker_id == other.worker_id
    assert [a.outcome for a in done.attempts] == ["handed_back", "completed"]


async def test_cancel_running_job_stops_it_within_a_second(
    control_plane, start_worker, demo_fn, client
) -> None:
    worker = await start_worker()
    job = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[30]))
    # Running, as recorded (the worker may hold the message a moment before it claims it).
    await assert_eventually(lambda: _status(client, job.job_id, "running"), timeout=30)
    asked = await client.cancel(job.job_id, reason="changed my mind")
    assert asked.status == "cancelling"
    done = await client.wait(job.job_id, timeout=30)  # how fast: loadtest, not a unit test
    assert done.status == "cancelled" and done.error.message == "changed my mind"
    # The worker stopped it, not the control plane's fallback (which confirms after 10 s).
    assert done.attempts[-1].outcome == "cancelled" and control_plane.reaper.cancels_confirmed == 0
    assert not worker.executor.running
    after = await client.run(job_spec("demo-fn:v1", function="add", args=[2, 2]), timeout=10)
    assert after.output.result == 4 and after.worker_id == worker.worker_id  # same worker, no restart


async def test_cancel_running_generation(control_plane, start_worker, demo_model, client) -> None:
    worker = await start_worker(runtimes=["transformers"])
    await client.run(job_spec("demo-gpt2:v1", prompt="warm", max_tokens=1), timeout=60)
    job = await client.submit(job_spec("demo-gpt2:v1", prompt="go on", max_tokens=900))
    await assert_eventually(lambda: _status(client, job.job_id, "streaming"), timeout=20)
    await client.cancel(job.job_id)
    done = await client.wait(job.job_id, timeout=5)
    assert done.status == "cancelled"
    assert not worker.executor.running


async def _status(client, job_id: str, status: str) -> bool:  # noqa: ANN001
    return (await client.get(job_id)).status == status


async def test_worker_enforces_timeout_and_frees_the_slot(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(max_concurrent_jobs=1)
    spec = job_spec("demo-fn:v1", function="sleep", args=[30], timeout_seconds=0.5)
    spec.retry_config = None
    record = await client.run(spec, timeout=20)
    # timeouts are retryable: the default policy retries twice, then the job times out
    assert record.status == "timeout" and record.error.code == "timeout"
    assert [a.outcome for a in record.attempts] == ["timeout", "timeout", "timeout"]
    await assert_eventually(lambda: worker.free_slots == 1, timeout=2)
    quick = await client.run(job_spec("demo-fn:v1", function="add", args=[1, 2]), timeout=10)
    assert quick.status == "completed"


async def test_retries_follow_the_policy(control_plane, start_worker, demo_fn, client) -> None:
    await start_worker()
    retry = {"strategy": "fixed", "max_retries": 3, "initial_delay_seconds": 0.05, "jitter": False,
             "retry_on_errors": ["execution_error"]}
    spec = decode(encode({**_spec_dict("flaky", ["k1", 2]), "retry_config": retry}), type(job_spec("a:b")))
    record = await client.run(spec, timeout=30)
    assert record.status == "completed" and record.output.result == 3
    assert [a.outcome for a in record.attempts] == ["failed", "failed", "completed"]
    assert all(a.error.code == "execution_error" for a in record.attempts[:2])

    no_retry = await client.run(job_spec("demo-fn:v1", function="fail"), timeout=30)
    assert no_retry.status == "failed" and len(no_retry.attempts) == 1  # not retryable by default

    retried = await client.retry(no_retry.job_id)
    assert retried.status == "queued"
    done = await client.wait(no_retry.job_id, timeout=10)
    assert done.status == "failed" and len(done.attempts) == 2


def _spec_dict(function: str, args: list) -> dict:
    return {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": function}},
            "input": {"args": args}}


async def test_worker_control_subject(control_plane, start_worker, demo_fn, nc, names) -> None:
    worker = await start_worker()
    reply = await nc.request(names.worker_control_subject(worker.worker_id),
                             encode(WorkerCommand(command="status")), timeout=2)
    assert decode(reply.data, WorkerRecord).worker_id == worker.worker_id
    await nc.request(names.worker_control_subject(worker.worker_id), encode(WorkerCommand(command="drain")),
                     timeout=2)
    assert worker.exit_requested.is_set() and worker.exit_reason == "drain requested"


async def test_worker_recycles_after_max_jobs(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(max_jobs=3)
    for i in range(3):
        await client.run(job_spec("demo-fn:v1", function="add", args=[i, i]), timeout=10)
    await assert_eventually(lambda: worker.exit_requested.is_set())
    assert worker.exit_reason == "recycle: ran 3 jobs"


async def test_two_control_planes_share_the_work(
    nats_settings, layout, start_worker, demo_fn, client
) -> None:
    from control_plane import ControlPlane, ControlPlaneSettings

    conns = [await nats.connect(nats_settings.servers) for _ in range(2)]
    cps = [ControlPlane(c, nats_settings, ControlPlaneSettings()) for c in conns]
    for cp in cps:
        await cp.start()
    try:
        await start_worker(max_concurrent_jobs=16)
        results = await asyncio.gather(*(client.run(job_spec("demo-fn:v1", function="add", args=[i, 1]),
                                                    timeout=30) for i in range(60)))
        assert sorted(r.output.result for r in results) == [i + 1 for i in range(60)]
        served = [sum(e.num_requests for e in cp.service.stats().endpoints) for cp in cps]
        assert all(n > 0 for n in served), served
    finally:
        for cp in cps:
            await cp.stop()
        for c in conns:
            await c.close()


async def test_listing_and_models(control_plane, start_worker, demo_fn, demo_model, client) -> None:
    await start_worker()
    ids = [(await client.run(job_spec("demo-fn:v1", function="add", args=[i, 0]), timeout=10)).job_id
           for i in range(5)]
    failed = await client.run(job_spec("demo-fn:v1", function="fail"), timeout=10)
    page1 = await client.list(limit=3)
    assert [j.job_id for j in page1.jobs] == sorted(ids + [failed.job_id], reverse=True)[:3]
    page2 = await client.list(limit=3, cursor=page1.next_cursor)
    assert [j.job_id for j in page2.jobs] == sorted(ids + [failed.job_id], reverse=True)[3:6]
    assert page2.next_cursor is None
    only_failed = await client.list(status=["failed"])
    assert [j.job_id for j in only_failed.jobs] == [failed.job_id]
    by_model = await client.list(model="demo-gpt2:v1")
    assert by_model.jobs == []
    names_ = [m.name for m in await client.models()]
    assert names_ == ["demo-fn:v1", "demo-gpt2:v1"]
    assert (await client.model("demo-gpt2:v1")).runtime == "transformers"
    assert [m.name for m in await client.models(runtime="python")] == ["demo-fn:v1"]
