"""Prometheus metrics, scraped over HTTP from a real control plane and real workers."""

from __future__ import annotations

import asyncio
import socket

import httpx
import nats
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from control_plane import ControlPlane, ControlPlaneSettings
from mnemos.client import job_spec
from mnemos.config import NatsSettings
from mnemos.errors import UnknownModel
from mnemos.messages import RetryPolicy, decode, encode
from mnemos.metrics import MetricsUnavailable, serve_metrics
from neuron_runtime import Worker, WorkerSettings
from tests.conftest import assert_eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    """Every sample of ``url`` by (sample name, labels)."""
    async with httpx.AsyncClient() as http:
        reply = await http.get(url, timeout=5.0)
    reply.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def cp_url(cp: ControlPlane) -> str:
    assert cp.metrics_server is not None
    return cp.metrics_server.url


async def test_control_plane_counts_queue_requests_cancels_and_workers(
    control_plane, start_worker, demo_fn, client
) -> None:
    url = cp_url(control_plane)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    jobs = [await client.submit(job_spec("demo-fn:v1", function="add", args=[i, 1], priority=7)) for i in range(3)]
    with pytest.raises(UnknownModel):
        await client.submit(job_spec("nope:v1", function="add"))

    # No worker yet: the three jobs wait in the python queue at priority 7.
    async def queued(n: int) -> bool:
        s = await scrape(url)
        return value(s, "mnemos_queue_depth", runtime="python", priority="7") == n

    await assert_eventually(lambda: queued(3), timeout=5, message="queue depth not 3")
    s = await scrape(url)
    assert value(s, "mnemos_queue_depth", runtime="python", priority="5") == 0
    assert value(s, "mnemos_api_requests_total", endpoint="jobs-submit", code="ok") == 3
    assert value(s, "mnemos_api_requests_total", endpoint="jobs-submit", code="unknown_model") == 1
    assert value(s, "mnemos_api_request_seconds_count", endpoint="jobs-submit") == 4
    assert value(s, "mnemos_workers", status="idle") == 0

    await client.cancel(jobs[0].job_id)  # cancelled while queued: the control plane ends it
    await assert_eventually(lambda: queued(2), timeout=5, message="queue depth not 2 after a cancel")
    s = await scrape(url)
    assert value(s, "mnemos_jobs_finished_total", status="cancelled", runtime="python") == 1
    assert value(s, "mnemos_api_requests_total", endpoint="jobs-cancel", code="ok") == 1
    await client.cancel(jobs[0].job_id)  # again: nothing changes, nothing is counted
    s = await scrape(url)
    assert value(s, "mnemos_jobs_finished_total", status="cancelled", runtime="python") == 1
    assert value(s, "mnemos_api_requests_total", endpoint="jobs-cancel", code="ok") == 2

    await start_worker()
    for job in jobs[1:]:
        assert (await client.wait(job.job_id, timeout=30)).status == "completed"

    async def drained_and_idle() -> bool:
        s = await scrape(url)
        return (value(s, "mnemos_queue_depth", runtime="python", priority="7") == 0
                and value(s, "mnemos_workers", status="idle") == 1)

    await assert_eventually(drained_and_idle, timeout=10, message="queue not drained or worker not idle")
    # Jobs a worker finished are counted by that worker, not by the control plane.
    s = await scrape(url)
    assert value(s, "mnemos_jobs_finished_total", status="completed", runtime="python") == 0


async def test_job_ended_by_the_reaper_is_counted_once(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker()
    assert worker.metrics_server is not None
    spec = job_spec("demo-fn:v1", function="sleep", args=[2])
    spec.retry_config = decode(encode({"max_retries": 0}), RetryPolicy)
    job = await client.submit(spec)

    async def running() -> bool:
        return (await client.get(job.job_id)).status == "running"

    await assert_eventually(running, timeout=10, message="job not running")
    # Declared dead while it runs: the control plane ends the job; the worker's late result is dropped.
    ended = await control_plane.reaper.recover_job(job.job_id, worker.worker_id)
    assert ended is not None and ended.status == "failed"
    await assert_eventually(lambda: worker.executor.duplicates == 1, timeout=10, message="late result not dropped")
    cp, w = await scrape(cp_url(control_plane)), await scrape(worker.metrics_server.url)
    assert value(cp, "mnemos_jobs_finished_total", status="failed", runtime="python") == 1
    assert not [k for k in w if k[0] == "mnemos_jobs_finished_total"]
    assert value(w, "mnemos_job_execution_seconds_count", runtime="python") == 1  # the attempt did run


async def test_worker_counts_jobs_timings_and_cache(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(max_concurrent_jobs=3)
    assert worker.metrics_server is not None
    url = worker.metrics_server.url
    [listed] = await client.workers()
    assert listed.tags["metrics"] == url

    n = 4
    for i in range(n):
        record = await client.run(job_spec("demo-fn:v1", function="add", args=[i, i]), timeout=30)
        assert record.status == "completed"
    failed = await client.run(job_spec("demo-fn:v1", function="fail", args=["kaput"]), timeout=30)
    assert failed.status == "failed"

    s = await scrape(url)
    assert value(s, "mnemos_jobs_finished_total", status="completed", runtime="python") == n
    assert value(s, "mnemos_jobs_finished_total", status="failed", runtime="python") == 1
    for histogram in ("mnemos_job_queue_wait_seconds", "mnemos_job_execution_seconds"):
        assert value(s, f"{histogram}_count", runtime="python") == n + 1
        assert value(s, f"{histogram}_bucket", runtime="python", le="+Inf") == n + 1
        assert value(s, f"{histogram}_sum", runtime="python") > 0
    # "fail" is another function: another model in memory, whose files are already on disk.
    assert value(s, "mnemos_model_load_seconds_count", runtime="python") == 2
    assert value(s, "mnemos_model_cache_misses_total", tier="memory") == 2
    assert value(s, "mnemos_model_cache_hits_total", tier="memory") == n - 1
    assert value(s, "mnemos_model_cache_misses_total", tier="disk") == 1
    assert value(s, "mnemos_model_cache_hits_total", tier="disk") == 1
    assert value(s, "mnemos_time_to_first_token_seconds_count", runtime="python") == 0  # nothing streamed
    assert value(s, "mnemos_tokens_per_second_count", runtime="python") == 0  # not a text runtime
    assert value(s, "mnemos_worker_slots") == 3
    assert value(s, "mnemos_worker_busy_slots") == 0
    assert value(s, "mnemos_jobs_in_progress") == 0


async def test_worker_gauges_follow_running_jobs(control_plane, start_worker, demo_fn, client) -> None:
    worker = await start_worker(max_concurrent_jobs=4)
    assert worker.metrics_server is not None
    url = worker.metrics_server.url
    jobs = [await client.submit(job_spec("demo-fn:v1", function="sleep", args=[30])) for _ in range(2)]

    async def busy(n: int) -> bool:
        s = await scrape(url)
        return value(s, "mnemos_worker_busy_slots") == n and value(s, "mnemos_jobs_in_progress") == n

    await assert_eventually(lambda: busy(2), timeout=10, message="two jobs not in progress")
    for job in jobs:
        await client.cancel(job.job_id)
    await assert_eventually(lambda: busy(0), timeout=15, message="jobs still in progress after cancel")
    s = await scrape(url)
    assert value(s, "mnemos_jobs_finished_total", status="cancelled", runtime="python") == 2


async def test_text_jobs_observe_first_token_and_tokens_per_second(
    control_plane, start_worker, demo_model, client
) -> None:
    worker = await start_worker(runtimes=["transformers"])
    assert worker.metrics_server is not None
    record = await client.run(job_spec("demo-gpt2:v1", prompt="hello", max_tokens=5), timeout=60)
    assert record.status == "completed"
    s = await scrape(worker.metrics_server.url)
    labels = {"runtime": "transformers"}
    assert value(s, "mnemos_time_to_first_token_seconds_count", **labels) == 1
    assert value(s, "mnemos_tokens_per_second_count", **labels) == 1
    assert value(s, "mnemos_tokens_per_second_sum", **labels) > 0
    assert value(s, "mnemos_model_load_seconds_count", **labels) == 1
    assert value(s, "mnemos_jobs_finished_total", status="completed", **labels) == 1


async def test_taken_port_fails_start_clearly_and_disabled_serves_nothing(
    nats_settings: NatsSettings, control_plane, start_worker, client, tmp_path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conn = await nats.connect(nats_settings.servers)
        try:
            cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(metrics_port=port))
            with pytest.raises(MetricsUnavailable, match=f"127.0.0.1:{port}.*MNEMOS_CP_METRICS_PORT"):
                await cp.start()
            assert cp.service is None  # failed before starting anything
            await cp.stop()
            worker = Worker(conn, nats_settings, WorkerSettings(metrics_port=port, runtimes=["python"],
                                                                 cache_dir=tmp_path / "cache"))
            with pytest.raises(MetricsUnavailable, match="MNEMOS_WORKER_METRICS_PORT"):
                await worker.start()
            assert worker.puller is None
            await worker.drain()
        finally:
            await conn.close()
    assert await client.workers() == []
    worker = await start_worker(metrics_port=-1)
    assert worker.metrics_server is None
    [listed] = await client.workers()
    assert "metrics" not in listed.tags


async def test_metrics_server_paths_formats_and_close() -> None:
    registry = CollectorRegistry()
    Counter("mnemos_test_things", "Things.", registry=registry).inc(2)
    calls: list[int] = []

    async def before() -> None:
        calls.append(1)

    server = await serve_metrics(registry, "127.0.0.1", 0, before_scrape=before)
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as http:
        text = await http.get(f"{base}/metrics")
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        assert "mnemos_test_things_total 2.0" in text.text
        om = await http.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")
        assert (await http.get(f"{base}/other")).status_code == 404
        assert (await http.post(f"{base}/metrics")).status_code == 405
    assert len(calls) == 2
    # Several registries in one process stay apart.
    other = await serve_metrics(CollectorRegistry(), "127.0.0.1", 0)
    assert "mnemos_test_things" not in (await scrape(other.url)) and other.port != server.port
    await other.close()
    await server.close()
    await server.close()  # twice is fine
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"{base}/metrics")


async def test_a_hung_scrape_does_not_hold_up_close() -> None:
    server = await serve_metrics(CollectorRegistry(), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the headers
    await writer.drain()
    await asyncio.wait_for(server.close(), timeout=2.0)
    assert await reader.read() == b""  # closed without an answer
    writer.close()
