"""``bench http``: the HTTP gateway under load (it asserts nothing; it prints numbers).

Through a real uvicorn gateway in front of the control plane and a worker:
- ``POST /v1/jobs?wait=30`` of no-op Python jobs, from ``--procs`` load-generator
  processes with ``--window`` requests in flight each (jobs/s over the whole run), then
  sequential round trips (p50/p95/p99 ms);
- ``POST /v1/completions`` (16 tokens of the demo model), sequential: latency, and with
  ``stream: true`` the time to the first ``data:`` chunk.

The load generator is aiohttp (its HTTP/1.1 client costs a third of httpx's per request),
in separate processes so that it is not what limits the throughput: with ``--cpu`` the run
prints the CPU each process spent per job, the generators included.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.bench import CpuUsage, percentiles
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings

__all__ = ["HttpOptions", "bench_http", "drive"]

_NOOP = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "noop"}}}


@dataclass
class HttpOptions:
    jobs: int = 3000
    #: Requests in flight per load-generator process.
    window: int = 16
    #: Load-generator processes.
    procs: int = 2
    roundtrips: int = 300
    completions: int = 50
    warmup: int = 100


@dataclass
class Driven:
    """What one load-generator process did: jobs, failures, its first request's start and
    its last answer's end (epoch seconds), and the CPU it spent meanwhile."""

    ok: int
    failed: int
    started: float
    ended: float
    cpu_s: float


def _session(base_url: str, api_key: str | None, connections: int) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(base_url=base_url, headers=headers,
                                 connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def _job(http: aiohttp.ClientSession) -> bool:
    async with http.post("/v1/jobs", params={"wait": "30"}, json=_NOOP) as r:
        body = await r.json()
        return r.status == 200 and body.get("status") == "completed"


async def drive(base_url: str, jobs: int, window: int, api_key: str | None, start_at: float) -> Driven:
    """``jobs`` no-op jobs with ``window`` in flight, from ``start_at`` (epoch seconds)."""
    async with _session(base_url, api_key, window) as http:
        await _job(http)  # connect before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0, started = time.process_time(), time.time()
        sem = asyncio.Semaphore(window)

        async def windowed() -> bool:
            async with sem:
                try:
                    return await _job(http)
                except (aiohttp.ClientError, TimeoutError):
                    return False

        ok = await asyncio.gather(*(windowed() for _ in range(jobs)))
        return Driven(ok=ok.count(True), failed=ok.count(False), started=started, ended=time.time(),
                      cpu_s=time.process_time() - cpu0)


def _drive_in_process(base_url: str, jobs: int, window: int, api_key: str | None, start_at: float,
                      out: Any) -> None:
    out.put(asyncio.run(drive(base_url, jobs, window, api_key, start_at)))


def throughput(base_url: str, o: HttpOptions, api_key: str | None = None) -> list[Driven]:
    """Run ``o.jobs`` spread over ``o.procs`` fresh processes that start together."""
    ctx = multiprocessing.get_context("spawn")  # nothing of this process (its threads, its loop) is copied
    out = ctx.Queue()
    start_at = time.time() + 2.0 + 0.5 * o.procs  # after every process has imported and connected
    share = [o.jobs // o.procs + (1 if i < o.jobs % o.procs else 0) for i in range(o.procs)]
    procs = [ctx.Process(target=_drive_in_process, args=(base_url, n, o.window, api_key, start_at, out))
             for n in share]
    for p in procs:
        p.start()
    results: list[Driven] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load-generator process failed (exit codes {dead})") from None
    for p in procs:
        p.join(30)
    return results


async def latency(base_url: str, o: HttpOptions, api_key: str | None = None,
                  nats: NatsSettings | None = None) -> dict[str, float]:
    """Sequential round trips of no-op jobs, then ``/v1/completions`` whole and streamed,
    and (given ``nats``) the same generation as a ``jobs.run`` through the SDK, in turns."""
    client = await Client.connect(nats) if nats is not None else None
    async with _session(base_url, api_key, 1) as http:
        samples = []
        for _ in range(o.roundtrips):
            t = time.perf_counter()
            await _job(http)
            samples.append((time.perf_counter() - t) * 1000.0)
        p = percentiles(samples)
        print(f"HTTP round trip ({o.roundtrips} sequential): p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f} ms, "
              f"p99 {p['p99']:.2f} ms")

        body: dict[str, Any] = {"model": "demo-gpt2:v1", "prompt": "the quick brown fox", "max_tokens": 16,
                                "temperature": 0}
        async with http.post("/v1/completions", json=body) as r:  # the worker loads the model
            await r.read()
        whole, first, over_nats = [], [], []
        same_job = job_spec("demo-gpt2:v1", prompt=body["prompt"], max_tokens=16, temperature=0)
        for _ in range(o.completions):
            if client is not None:
                t = time.perf_counter()
                done = await client.run(same_job, timeout=60)
                assert done.status == "completed", done.error
                over_nats.append((time.perf_counter() - t) * 1000.0)
            t = time.perf_counter()
            async with http.post("/v1/completions", json=body) as r:
                text = await r.text()
                assert r.status == 200, text
            whole.append((time.perf_counter() - t) * 1000.0)
            t = time.perf_counter()
            async with http.post("/v1/completions", json={**body, "stream": True}) as s:
                async for raw in s.content:
                    line = raw.decode()
                    if line.startswith("data: {") and '"text":""' not in line:
                        first.append((time.perf_counter() - t) * 1000.0)
                        break
        pw, pf = percentiles(whole), percentiles(first)
        print(f"/v1/completions, 16 tokens: p50 {pw['p50']:.1f} ms, p99 {pw['p99']:.1f} ms; "
              f"streamed, first token p50 {pf['p50']:.1f} ms, p99 {pf['p99']:.1f} ms")
    out = {**{f"{k}_ms": v for k, v in p.items()}, "completion_p50_ms": pw["p50"],
           "stream_first_token_p50_ms": pf["p50"]}
    if client is not None:
        await client.close()
        pn = percentiles(over_nats)
        print(f"the same generation over NATS (jobs.run, SDK): p50 {pn['p50']:.1f} ms, p99 {pn['p99']:.1f} ms; "
              f"HTTP adds {pw['p50'] - pn['p50']:+.1f} ms at p50")
        out["completion_nats_p50_ms"] = pn["p50"]
    return out


def bench_http(
    base_url: str,
    o: HttpOptions,
    api_key: str | None = None,
    cpu: Callable[[], AbstractContextManager[CpuUsage]] | None = None,
    nats: NatsSettings | None = None,
) -> dict[str, float]:
    """The numbers. ``cpu``: measure each process's CPU over the throughput phase (the
    load-generator processes count as the load generator) and print it per job. ``nats``:
    the deployment's NATS, to time the completion over NATS too."""

    async def warm() -> None:
        async with _session(base_url, api_key, 1) as http:
            for _ in range(o.warmup):
                await _job(http)

    asyncio.run(warm())
    if cpu is None:
        driven = throughput(base_url, o, api_key)
    else:
        with cpu() as usage:
            driven = throughput(base_url, o, api_key)
        usage.seconds["load generator"] = usage.seconds.get("load generator", 0.0) + sum(d.cpu_s for d in driven)
    ok, failed = sum(d.ok for d in driven), sum(d.failed for d in driven)
    elapsed = max(d.ended for d in driven) - min(d.started for d in driven)
    rate = (ok + failed) / elapsed
    print(f"HTTP throughput: {ok + failed} no-op jobs (POST /v1/jobs?wait) in {elapsed:.2f}s = {rate:,.0f} jobs/s "
          f"({o.procs} aiohttp processes x {o.window} in flight, failures {failed})")
    if cpu is not None:
        print(usage.report(ok + failed))
    return {"jobs_per_s": rate, "failures": float(failed), **asyncio.run(latency(base_url, o, api_key, nats))}
