"""Guarantees about queued jobs, on a real nats-server: a queue deadline, why a job waits,
a message that vanished from under a queued job, and the dead-letter list."""

from __future__ import annotations

from typing import Any

import httpx

from control_plane.reaper import ReaperTimings
from mnemos.client import Client, job_spec
from mnemos.messages import JobRecord, RetryPolicy
from mnemos.names import Names
from tests.conftest import assert_eventually


async def _status(client: Client, job_id: str, *statuses: str) -> JobRecord | None:
    r = await client.get(job_id)
    return r if r.status in statuses else None


async def test_a_job_nobody_takes_ends_at_its_queue_deadline_and_says_why_it_waited(
    control_plane: Any, demo_fn: Any, client: Client
) -> None:
    job = await client.submit(job_spec("demo-fn:v1", function="noop", queue_timeout_seconds=1.5))
    waiting = await client.get(job.job_id)
    assert waiting.status == "queued"
    assert waiting.waiting is not None and waiting.waiting.reason == "no_worker_for_runtime", waiting.waiting
    assert "python" in waiting.waiting.detail
    done = await client.wait(job.job_id, timeout=30)
    assert done.status == "timeout" and done.error is not None and done.error.code == "queue_timeout", done
    assert done.attempts == [] and done.dead_letter is False and done.waiting is None
    assert control_plane.reaper.queue_timeouts >= 1


async def test_a_job_behind_a_busy_worker_waits_for_capacity(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client
) -> None:
    worker = await start_worker(runtimes=["python"], max_concurrent_jobs=1)
    await assert_eventually(lambda: _serving(control_plane, worker.worker_id), timeout=30,
                            message="the control plane never heard the worker")
    first = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[3]))
    await assert_eventually(lambda: _status(client, first.job_id, "running"), timeout=30)
    second = await client.submit(job_spec("demo-fn:v1", function="noop"))
    behind = await client.get(second.job_id)
    assert behind.status == "queued"
    assert behind.waiting is not None and behind.waiting.reason == "waiting_for_capacity", behind.waiting
    listed = await client.list(status=["queued"])
    assert [j.waiting.reason for j in listed.jobs if j.job_id == second.job_id] == ["waiting_for_capacity"]
    assert (await client.wait(second.job_id, timeout=30)).status == "completed"


async def _serving(control_plane: Any, worker_id: str) -> bool:
    w = control_plane.reaper.live.get(worker_id)
    return w is not None and w.status in ("idle", "busy")


async def test_a_queued_job_whose_message_vanished_is_queued_again(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, nc: Any, names: Names
) -> None:
    """The record says queued, the stream no longer holds its message (acknowledged by
    mistake, purged): the sweep finds the message missing and sends a new one."""
    control_plane.reaper.timings = ReaperTimings(requeue_check_s=0.5)
    job = await client.submit(job_spec("demo-fn:v1", function="add", args=[40, 2]))
    assert job.queued_seq is not None
    await nc.jetstream().delete_msg(names.dispatch_stream, job.queued_seq)
    await assert_eventually(lambda: _repaired(control_plane), timeout=30, message="the sweep never noticed")
    await start_worker(runtimes=["python"])
    done = await client.wait(job.job_id, timeout=30)
    assert done.status == "completed" and done.output is not None and done.output.result == 42
    assert len(done.attempts) == 1  # one message came back, not two


async def _repaired(control_plane: Any) -> bool:
    return control_plane.reaper.repaired >= 1


async def test_dead_letters_are_listed_with_their_attempts(
    control_plane: Any, start_worker: Any, start_gateway: Any, demo_fn: Any, client: Client
) -> None:
    await start_worker(runtimes=["python"])
    spec = job_spec("demo-fn:v1", function="fail", args=["no luck"])
    spec.retry_config = RetryPolicy(max_retries=1, initial_delay_seconds=0.01, jitter=False,
                                    retry_on_errors=["execution_error"])
    dead = await client.run(spec, timeout=60)
    assert dead.status == "failed" and dead.dead_letter, dead
    assert [a.outcome for a in dead.attempts] == ["failed", "failed"]
    fine = await client.run(job_spec("demo-fn:v1", function="noop"), timeout=30)
    assert fine.status == "completed" and not fine.dead_letter

    listed = await client.list(dead_letter=True)
    assert [j.job_id for j in listed.jobs] == [dead.job_id]
    assert [a.outcome for a in listed.jobs[0].attempts] == ["failed", "failed"]
    assert (await client.list(dead_letter=True, status=["timeout"])).jobs == []

    # A retry by request takes it off the list and runs it once more (the attempts before
    # count against its policy), and it is back on the list.
    retried = await client.retry(dead.job_id)
    assert retried.status == "queued" and not retried.dead_letter
    again = await client.wait(dead.job_id, timeout=60)
    assert again.status == "failed" and again.dead_letter and len(again.attempts) == 3

    url = await start_gateway()
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/v1/jobs", params={"dead_letter": "true"})
        assert r.status_code == 200, r.text
        assert [j["job_id"] for j in r.json()["jobs"]] == [dead.job_id]
        assert r.json()["jobs"][0]["dead_letter"] is True


async def test_the_cli_shows_why_a_job_waits_and_lists_dead_letters(
    nats_settings: Any, control_plane: Any, demo_fn: Any, client: Client
) -> None:
    import json

    from tests.test_cli import _cli

    queued = await _cli(nats_settings, "-o", "json", "submit", "-m", "demo-fn:v1", "--function", "noop",
                        "--queue-timeout", "600")
    assert queued.returncode == 0, queued.stderr
    job = json.loads(queued.stdout)
    assert job["spec"]["queue_timeout_seconds"] == 600
    shown = await _cli(nats_settings, "jobs", "get", job["job_id"])
    assert shown.returncode == 0, shown.stderr
    assert "no_worker_for_runtime" in shown.stdout and "python" in shown.stdout, shown.stdout

    # A dead letter made without any worker: a job whose only allowed attempt was lost.
    spec = job_spec("demo-fn:v1", function="noop")
    spec.retry_config = RetryPolicy(max_retries=0)
    lost = await client.submit(spec)

    def gone(rec: JobRecord) -> JobRecord:
        from mnemos import lifecycle
        from mnemos.messages import utcnow

        lifecycle.claim(rec, "w-gone", utcnow(), generation=0, redelivered=False, warm=True, dispatch_seq=None)
        lifecycle.lose_attempt(rec, "w-gone", utcnow())
        return rec

    dead, _ = await control_plane.jobs.mutate(lost.job_id, gone)
    assert dead.status == "failed" and dead.dead_letter
    listed = await _cli(nats_settings, "-o", "json", "jobs", "ls", "--dead-letter")
    assert listed.returncode == 0, listed.stderr
    assert [j["job_id"] for j in json.loads(listed.stdout)["jobs"]] == [lost.job_id]
    table = await _cli(nats_settings, "jobs", "get", lost.job_id)
    assert "dead letter" in table.stdout and "lost on w-gone" in table.stdout, table.stdout
