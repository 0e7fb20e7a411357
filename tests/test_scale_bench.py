"""``bench scale`` at a tiny size, end to end on a real stack (embedded nats-server, control
plane, a worker started after the submissions): every job queued is drained and
completed, and every number it reports is there and plausible."""

from __future__ import annotations

import math

import pytest

from loadtest.scale_bench import ScaleOptions, bench_scale, format_table

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_scale_bench_queues_lists_and_drains_every_job() -> None:
    n = 200
    (r,) = await bench_scale(ScaleOptions(sizes=(n,), window=64, list_calls=5, idle_cpu_s=0.5))

    assert r["n"] == n
    assert (r["completed"], r["failed"]) == (n, 0)
    assert r["dispatch_messages_queued"] == n  # no worker took any while they were submitted
    for key in ("submit_jobs_per_s", "drain_jobs_per_s", "list_p50_ms", "list_queued_p50_ms", "cp_restart_s",
                "rss_mb_nats_queued", "rss_mb_cp_queued", "rss_mb_cp_drained", "rss_mb_worker_drained",
                "dispatch_bytes_per_job_queued", "jobs_kv_bytes_per_job_queued",
                "jobs_kv_bytes_per_job_drained", "results_bytes_per_job_drained"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["dispatch_bytes_per_job_drained"] == 0  # a work queue: acked messages are gone
    # A job record grows when it completes (attempts, output), and is under a few KiB.
    assert r["jobs_kv_bytes_per_job_queued"] < r["jobs_kv_bytes_per_job_drained"] < 8192
    assert r["list_p50_ms"] < 5000 and r["wall_s"] > r["submit_s"] + r["drain_s"]
    assert f"| {n} |" in format_table([r])
