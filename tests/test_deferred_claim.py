"""A ``jobs.run`` job on a loaded model runs before its claim is written (the worker's
deferred claim): one record write for a short job, the claim on record for a long one, and a
record changed meanwhile by somebody else decides, as with any compare-and-set."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from control_plane import ControlPlane, ControlPlaneSettings
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.messages import JobRecord, decode, encode
from mnemos.names import Names
from tests.conftest import answers_on, assert_eventually


class _Writes:
    """Counts the writes to each job record: a core subscription sees every KV publish,
    refused compare-and-sets included (the bucket keeps one revision per key, so its
    history cannot tell)."""

    def __init__(self) -> None:
        self.by_key: collections.Counter[str] = collections.Counter()

    async def start(self, nc: NATS, names: Names) -> "_Writes":
        async def count(msg: Msg) -> None:
            self.by_key[msg.subject.rpartition(".")[2]] += 1

        await nc.subscribe(Names.kv_key_subject(names.jobs_bucket, "*"), cb=count)
        await nc.flush()
        return self


@pytest.fixture
async def writes(nc: NATS, names: Names) -> _Writes:
    return await _Writes().start(nc, names)


async def _warm(client: Client, function: str = "noop") -> None:
    """Load the function (a model not in memory yet is claimed before it loads)."""
    assert (await client.run(job_spec("demo-fn:v1", function=function, args=[0] if function == "sleep" else []),
                             timeout=30)).status == "completed"


async def test_a_short_run_job_is_recorded_in_one_write(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, writes: _Writes
) -> None:
    await start_worker()
    await client.run(job_spec("demo-fn:v1", function="add", args=[0, 0]), timeout=30)
    done = await client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]), timeout=30)
    assert done.status == "completed" and done.output is not None and done.output.result == 5
    assert [a.outcome for a in done.attempts] == ["completed"]
    assert [p.name for p in done.attempts[0].phases] == ["acquired", "running", "completed"]
    assert writes.by_key[done.job_id] == 1  # claim and result together


async def test_claim_delay_zero_writes_the_claim_first(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, writes: _Writes
) -> None:
    await start_worker(claim_delay_ms=0)
    await _warm(client)
    done = await client.run(job_spec("demo-fn:v1", function="noop"), timeout=30)
    assert done.status == "completed"
    assert writes.by_key[done.job_id] == 2


async def _first_job(client: Client, status: str) -> JobRecord | None:
    """The newest job in ``status`` (a run job's id is known only from jobs.list)."""
    jobs = (await client.list(status=[status])).jobs
    return jobs[0] if jobs else None


async def test_a_run_job_that_outlives_the_delay_shows_running_and_can_be_cancelled(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, writes: _Writes
) -> None:
    worker = await start_worker(claim_delay_ms=50)
    await _warm(client, "sleep")
    call = asyncio.create_task(client.run(job_spec("demo-fn:v1", function="sleep", args=[30]), timeout=60))
    running = await assert_eventually(lambda: _first_job(client, "running"), timeout=10)
    assert running.worker_id == worker.worker_id and running.attempts[0].ended_at is None
    await client.cancel(running.job_id)
    done = await asyncio.wait_for(call, 30)
    assert done.status == "cancelled" and done.job_id == running.job_id
    assert [a.outcome for a in done.attempts] == ["cancelled"]


@pytest.fixture
async def eager_control_plane(nats_settings: NatsSettings, layout: Any) -> AsyncIterator[ControlPlane]:
    """A control plane that writes a ``jobs.run`` job's queued record at once (no deferral)."""
    conn = await nats.connect(nats_settings.servers, name="pytest-eager-cp")
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(run_record_delay_s=0))
    await cp.start()
    yield cp
    await cp.stop()
    await conn.close()


async def test_a_record_written_meanwhile_takes_the_claim_over(
    eager_control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, writes: _Writes
) -> None:
    """The control plane created the queued record while the worker ran without a claim on
    record: the result's write loses, re-reads, claims what is stored and records both."""
    await start_worker(claim_delay_ms=1000)
    await _warm(client, "sleep")
    done = await client.run(job_spec("demo-fn:v1", function="sleep", args=[0.2]), timeout=30)
    assert done.status == "completed" and [a.outcome for a in done.attempts] == ["completed"]
    # The control plane's create; the worker's create, refused (a core subscriber sees a
    # refused compare-and-set too); then claim + result on top of the queued record.
    assert writes.by_key[done.job_id] == 3


async def test_a_job_cancelled_before_its_claim_is_written_stays_cancelled(
    eager_control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, writes: _Writes
) -> None:
    """Cancelled while its record still said ``queued`` (the worker was running it without a
    claim on record): the cancel stands, the run is stopped, its result is dropped."""
    worker = await start_worker(claim_delay_ms=1000)
    await _warm(client, "sleep")
    call = asyncio.create_task(client.run(job_spec("demo-fn:v1", function="sleep", args=[30]), timeout=60))
    queued = await assert_eventually(lambda: _first_job(client, "queued"), timeout=10)
    assert (await client.cancel(queued.job_id)).status == "cancelled"
    done = await asyncio.wait_for(call, 30)
    assert done.status == "cancelled" and done.attempts == []
    # The worker stops the run when its claim's write finds the job cancelled.
    await assert_eventually(lambda: _idle(worker), timeout=10)
    final = await client.get(queued.job_id)
    assert final.status == "cancelled" and final.output is None and final.attempts == []


async def _idle(worker: Any) -> bool:
    return not worker.executor.running


async def test_a_run_job_is_answered_once_and_readable_at_once(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, nc: NATS, names: Names
) -> None:
    """Exactly one answer per job, sent once the record that ends it is stored: ``jobs.get``
    right after the answer finds the record it describes."""
    await start_worker()
    await _warm(client)
    inbox, answers = await answers_on(nc)
    spec = job_spec("demo-fn:v1", function="add", args=[20, 22])
    for _ in range(20):
        await nc.publish(names.api_subject("jobs.run"), encode(spec), reply=inbox)
        answer = decode((await asyncio.wait_for(answers.get(), 30)).data, JobRecord)
        assert answer.status == "completed" and answer.output is not None and answer.output.result == 42
        stored = await client.get(answer.job_id)
        assert (stored.status, stored.attempts) == (answer.status, answer.attempts)
    # A second answer to any of them would have arrived behind its job's record write.
    await nc.flush()
    await asyncio.sleep(0.2)
    assert answers.empty()
