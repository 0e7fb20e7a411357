"""``mnemos.SyncClient``: the blocking client scripts and notebooks use.

The control plane and worker of these tests run on pytest's event loop, so each script runs
in a thread (``asyncio.to_thread``), as a user's script would run beside the platform.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from mnemos import (
    JobNotFound,
    JobTimeout,
    NotConnected,
    ResultChunk,
    ResultFinal,
    SyncClient,
    Unavailable,
    ValidationFailed,
    job_spec,
)
from mnemos.config import NatsSettings


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mnemos-sync-client"]


async def test_every_method_blocks_until_done(nats_settings, control_plane, demo_fn, start_worker) -> None:
    await start_worker()

    def script() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with SyncClient.connect(nats_settings) as client:
            out["run"] = client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]))
            job = client.submit(job_spec("demo-fn:v1", function="count", args=[4]))
            out["stream"] = list(client.stream(job.job_id))
            out["wait"] = client.wait(job.job_id, timeout=10)
            out["get"] = client.get(job.job_id)
            out["list"] = client.list(model="demo-fn:v1", limit=10)
            slow = client.submit(job_spec("demo-fn:v1", function="sleep", args=[30]))
            out["cancel"] = client.cancel(slow.job_id, reason="not needed")
            out["cancelled"] = client.wait(slow.job_id, timeout=10)
            out["retry"] = client.retry(slow.job_id)
            client.cancel(slow.job_id)
            out["workers"] = client.workers()
            out["models"] = client.models(runtime="python")
            out["model"] = client.model("demo-fn:v1")
        return out

    out = await asyncio.to_thread(script)
    assert out["run"].status == "completed" and out["run"].output.result == 5
    chunks = [i for i in out["stream"] if isinstance(i, ResultChunk)]
    assert [c.data for c in chunks] == [0, 1, 2, 3]
    assert isinstance(out["stream"][-1], ResultFinal) and out["stream"][-1].status == "completed"
    assert out["wait"].status == out["get"].status == "completed"
    assert {j.job_id for j in out["list"].jobs} >= {out["run"].job_id, out["get"].job_id}
    assert out["cancel"].status in ("cancelling", "cancelled")
    assert out["cancelled"].status == "cancelled" and out["cancelled"].error.message == "not needed"
    assert out["retry"].status == "queued"
    assert len(out["workers"]) == 1
    assert [m.name for m in out["models"]] == ["demo-fn:v1"] == [out["model"].name]
    assert _loop_threads() == []  # closing stopped the loop thread


async def test_errors_arrive_unchanged(nats_settings, control_plane, demo_fn) -> None:
    def script() -> list[BaseException]:
        caught: list[BaseException] = []
        with SyncClient.connect(nats_settings) as client:
            for call in (
                lambda: client.get("01NOSUCHJOB"),
                lambda: client.submit(job_spec("demo-fn:v1", prompt="x", temperature=0.5, runtime="vllm")),
                lambda: client.wait(client.submit(job_spec("demo-fn:v1", function="sleep", args=[30])).job_id,
                                    timeout=0.3),
            ):
                with pytest.raises(Exception) as info:
                    call()
                caught.append(info.value)
        return caught

    missing, invalid, slow = await asyncio.to_thread(script)
    assert type(missing) is JobNotFound and missing.code == "job_not_found" and missing.status == 404
    assert type(invalid) is ValidationFailed and invalid.code == "validation_error"
    assert type(slow) is JobTimeout and isinstance(slow, TimeoutError)  # no worker: it stays queued


async def test_closed_client_raises_not_connected(nats_settings, control_plane) -> None:
    def script() -> tuple[BaseException, BaseException, bool]:
        client = SyncClient.connect(nats_settings)
        assert client.workers() == []
        stream = client.stream("01NOSUCHJOB")
        client.close()
        client.close()  # twice is fine
        with pytest.raises(NotConnected) as call:
            client.workers()
        with pytest.raises(NotConnected) as iterate:
            next(stream)
        return call.value, iterate.value, bool(_loop_threads())

    call, iterate, threads_left = await asyncio.to_thread(script)
    assert call.code == iterate.code == "not_connected"
    assert not threads_left


async def test_works_inside_a_running_event_loop(nats_settings, control_plane, demo_fn, start_worker) -> None:
    """As in Jupyter: the caller's thread already runs a loop, where asyncio.run would fail."""
    await start_worker()

    async def notebook_cell() -> Any:
        with SyncClient.connect(nats_settings) as client:
            return client.run(job_spec("demo-fn:v1", function="echo", args=["hi"]))

    record = await asyncio.to_thread(asyncio.run, notebook_cell())
    assert record.output.result == {"args": ["hi"], "kwargs": {}}


async def test_leaving_a_stream_early_and_tenants(nats_settings, control_plane, demo_fn, start_worker) -> None:
    await start_worker()

    def script() -> tuple[list[Any], str, Any]:
        with SyncClient.connect(nats_settings, tenant="acme") as acme:
            job = acme.submit(job_spec("demo-fn:v1", function="count", args=[50]))
            first = []
            for item in acme.stream(job.job_id):
                first.append(item)
                if isinstance(item, ResultChunk):
                    break  # closes the subscription on the client's loop
            other = acme.for_tenant("globex")
            with pytest.raises(JobNotFound):
                other.get(job.job_id)  # another tenant's job does not exist for it
            other.close()  # closes nothing: the connection belongs to `acme`
            return first, acme.wait(job.job_id, timeout=10).status, acme.get(job.job_id).tenant

    first, status, tenant = await asyncio.to_thread(script)
    assert isinstance(first[-1], ResultChunk) and first[-1].data == 0
    assert status == "completed" and tenant == "acme"


async def test_connect_failure_leaves_no_thread() -> None:
    settings = NatsSettings(nats_url="nats://127.0.0.1:1", nats_connect_timeout_s=0.5)
    with pytest.raises(Unavailable):
        await asyncio.to_thread(SyncClient.connect, settings)
    assert _loop_threads() == []
