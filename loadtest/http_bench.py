"""``bench http``: the HTTP gateway under load (it asserts nothing; it prints numbers).

Through a real uvicorn gateway in front of the control plane and a worker:
- ``POST /v1/jobs?wait=30`` of no-op Python jobs with a window of concurrent requests
  (jobs/s), then sequential round trips (p50/p95/p99 ms);
- ``POST /v1/completions`` (16 tokens of the demo model), sequential: latency, and with
  ``stream: true`` the time to the first ``data:`` chunk.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.bench import percentiles

__all__ = ["HttpOptions", "bench_http"]

_NOOP = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "noop"}}}


@dataclass
class HttpOptions:
    jobs: int = 3000
    window: int = 8
    roundtrips: int = 300
    completions: int = 50
    warmup: int = 100


async def bench_http(base_url: str, o: HttpOptions, api_key: str | None = None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=o.window, max_keepalive_connections=o.window)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as http:
        async def job() -> bool:
            r = await http.post("/v1/jobs", params={"wait": 30}, json=_NOOP)
            return r.status_code == 200 and r.json()["status"] == "completed"

        for _ in range(o.warmup):
            await job()
        sem = asyncio.Semaphore(o.window)

        async def windowed() -> bool:
            async with sem:
                return await job()

        t0 = time.perf_counter()
        ok = await asyncio.gather(*(windowed() for _ in range(o.jobs)))
        elapsed = time.perf_counter() - t0
        rate = o.jobs / elapsed
        print(f"HTTP throughput: {o.jobs} no-op jobs (POST /v1/jobs?wait) in {elapsed:.2f}s = {rate:,.0f} jobs/s "
              f"(window {o.window}, failures {ok.count(False)})")

        samples = []
        for _ in range(o.roundtrips):
            t = time.perf_counter()
            await job()
            samples.append((time.perf_counter() - t) * 1000.0)
        p = percentiles(samples)
        print(f"HTTP round trip ({o.roundtrips} sequential): p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f} ms, "
              f"p99 {p['p99']:.2f} ms")

        body: dict[str, Any] = {"model": "demo-gpt2:v1", "prompt": "the quick brown fox", "max_tokens": 16,
                                "temperature": 0}
        await http.post("/v1/completions", json=body)  # the worker loads the model
        whole, first = [], []
        for _ in range(o.completions):
            t = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            whole.append((time.perf_counter() - t) * 1000.0)
            t = time.perf_counter()
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: {") and '"text":""' not in line:
                        first.append((time.perf_counter() - t) * 1000.0)
                        break
        pw, pf = percentiles(whole), percentiles(first)
        print(f"/v1/completions, 16 tokens: p50 {pw['p50']:.1f} ms, p99 {pw['p99']:.1f} ms; "
              f"streamed, first token p50 {pf['p50']:.1f} ms, p99 {pf['p99']:.1f} ms")
    return {"jobs_per_s": rate, **{f"{k}_ms": v for k, v in p.items()},
            "completion_p50_ms": pw["p50"], "stream_first_token_p50_ms": pf["p50"]}
