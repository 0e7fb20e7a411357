"""The benchmark commands docs/benchmarks.md shows, run as a user runs them (small sizes):
they start their own stack, print their numbers and exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 240) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOS_")}
    out = subprocess.run([sys.executable, "-m", "loadtest", "bench", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_bench_workerstart_times_a_fresh_and_a_forked_worker() -> None:
    result = _run("workerstart", "--runs", "1")
    assert result["fresh_median_ms"] > result["zygote_median_ms"] > 0


def test_bench_affinity_reports_warm_hits() -> None:
    result = _run("affinity", "--jobs", "6")
    assert result["failures"] == 0 and result["loads"] >= 2  # each model loads once at least
    assert 0 <= result["warm_hit_pct"] <= 100


def test_bench_noop_prints_the_cpu_of_each_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOS_")}
    out = subprocess.run([sys.executable, "-m", "loadtest", "bench", "noop", "--jobs", "200", "--roundtrips", "20",
                          "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    per_job = {line.split()[0] for line in out.stdout.splitlines() if line.endswith("us/job")}
    assert {"nats-server", "control-plane", "worker-0", "load"} <= per_job


def test_bench_http_drives_the_gateway_from_several_processes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOS_")}
    out = subprocess.run([sys.executable, "-m", "loadtest", "bench", "http", "--jobs", "60", "--procs", "2",
                          "--window", "4", "--roundtrips", "5", "--completions", "2", "--cpu", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "60 no-op jobs" in out.stdout and "2 aiohttp processes x 4 in flight" in out.stdout
    per_job = {line.split()[0] for line in out.stdout.splitlines() if line.endswith("us/job")}
    assert {"nats-server", "control-plane", "worker-0", "gateway", "load"} <= per_job
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == 0 and result["jobs_per_s"] > 0 and result["completion_p50_ms"] > 0


def test_bench_noop_without_auth_runs_on_an_open_server() -> None:
    """`bench noop --no-auth`: the same stack without NATS users (what permissions cost)."""
    result = _run("noop", "--jobs", "200", "--roundtrips", "20", "--no-auth")
    assert result["failures"] == 0 and result["jobs_per_s"] > 0
