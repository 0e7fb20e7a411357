"""``jobs.start``: one request answered twice, the queued record at once and the final one
when the job ends (what ``POST /v1/jobs?wait`` uses), against a real control plane and worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mnemos.client import Client, job_spec
from mnemos.errors import UnknownModel, ValidationFailed
from mnemos.messages import JobRecord, decode, encode
from mnemos.names import HDR_SERVICE_ERROR_CODE, Names
from tests.conftest import answers_on, assert_eventually


async def test_start_returns_the_final_record_of_a_job_that_ends_in_time(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client
) -> None:
    await start_worker()
    done = await client.start(job_spec("demo-fn:v1", function="add", args=[2, 3]), wait=30)
    assert done.status == "completed" and done.output is not None and done.output.result == 5
    assert [a.outcome for a in done.attempts] == ["completed"]
    assert (await client.get(done.job_id)).status == "completed"


async def test_start_returns_the_queued_record_when_the_wait_ends_first(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client
) -> None:
    await start_worker()
    record = await client.start(job_spec("demo-fn:v1", function="sleep", args=[1.0]), wait=0.05)
    assert record.status == "queued" and not record.terminal
    # The job is on record from the first answer on, and goes on to the end.
    assert (await client.get(record.job_id)).job_id == record.job_id
    assert (await client.wait(record.job_id, timeout=30)).status == "completed"


async def test_the_two_answers_arrive_on_the_requests_subject(
    control_plane: Any, demo_fn: Any, start_worker: Any, nc: NATS, names: Names
) -> None:
    await start_worker()
    inbox, answers = await answers_on(nc)
    await nc.publish(names.api_subject("jobs.start"), encode(job_spec("demo-fn:v1", function="add", args=[1, 1])),
                     reply=inbox)
    records = [decode((await asyncio.wait_for(answers.get(), 30)).data, JobRecord) for _ in range(2)]
    assert sorted(r.status for r in records) == ["completed", "queued"]
    assert records[0].job_id == records[1].job_id
    await nc.flush()
    await asyncio.sleep(0.2)
    assert answers.empty()  # exactly two


async def test_bad_starts_get_the_error_envelope_and_a_key_goes_through_submit(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, nc: NATS, names: Names
) -> None:
    with pytest.raises(UnknownModel):
        await client.start(job_spec("nope:v1", prompt="x"), wait=5)
    keyed = job_spec("demo-fn:v1", function="add", args=[3, 4], idempotency_key="start-key-1")
    reply = await nc.request(names.api_subject("jobs.start"), encode(keyed), timeout=10)
    assert reply.headers is not None and reply.headers[HDR_SERVICE_ERROR_CODE] == str(ValidationFailed.status)
    await start_worker()
    done = await client.start(keyed, wait=30)  # the client submits and follows a keyed job
    assert done.status == "completed" and done.output is not None and done.output.result == 7
    assert (await client.start(keyed, wait=30)).job_id == done.job_id



async def test_a_started_job_is_claimed_before_it_runs(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, nc: NATS, names: Names
) -> None:
    """The message says the record follows it, so the worker claims the job on record
    before running it, as for ``jobs.submit``: it does not take it for a ``jobs.run`` job,
    whose claim it would defer and write with the result (racing the control plane's create)."""
    await start_worker()
    await client.run(job_spec("demo-fn:v1", function="noop"), timeout=30)  # warm: a deferred claim would apply
    written: list[tuple[str, str]] = []

    async def record(msg: Msg) -> None:
        rec = decode(msg.data, JobRecord)
        written.append((rec.job_id, rec.status))

    await nc.subscribe(Names.kv_key_subject(names.jobs_bucket, "*"), cb=record)
    await nc.flush()
    done = await client.start(job_spec("demo-fn:v1", function="noop"), wait=30)
    assert done.status == "completed"

    def ended() -> list[str] | None:
        statuses = [status for job, status in written if job == done.job_id]
        return statuses if "completed" in statuses else None

    statuses = await assert_eventually(ended)
    assert "running" in statuses[:statuses.index("completed")]
