"""``bench affinity``: do jobs go to the worker that already holds their model?

Two workers whose memory holds one model each (``MNEMOS_WORKER_MAX_LOADED_MODELS=1``), two
models (the demo GPT-2 and a second copy of it registered as ``demo-gpt2-b:v1``), and jobs
for the two models alternating, ``--concurrency`` in flight. A job is a **warm hit** when
its record says the model was in memory (``timings.cache_hit``); every miss is a model
load, and with one model per worker a miss also evicts the model that worker held.
Prints the warm-hit rate, the loads, and the round trip p50/p99 of each kind.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench import local_stack, percentiles
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings

__all__ = ["AffinityOptions", "bench_affinity", "SECOND_MODEL"]

SECOND_MODEL = "demo-gpt2-b:v1"


@dataclass
class AffinityOptions:
    jobs: int = 400
    concurrency: int = 2
    max_tokens: int = 4
    workers: int = 2


async def _register_second_model(settings: NatsSettings) -> None:
    from mnemos.connection import connect
    from registry import Registry, RegistrySettings
    from registry.demo import build_demo_model

    nc = await connect(settings, "bench-affinity")
    try:
        registry = Registry(nc.jetstream(), settings.names, RegistrySettings(artifact_store="nats"))
        await registry.start()
        with tempfile.TemporaryDirectory() as tmp:
            family, version = SECOND_MODEL.split(":")
            await registry.push(build_demo_model(Path(tmp) / "m"), family=family, version=version,
                                runtime="transformers", description="a second tiny GPT-2 (bench affinity)")
    finally:
        await nc.close()


async def run_affinity(settings: NatsSettings, o: AffinityOptions) -> dict[str, float]:
    """Alternate the two models' jobs against a running stack; the numbers."""
    client = await Client.connect(settings, request_timeout=60)
    models = ["demo-gpt2:v1", SECOND_MODEL]
    hits = misses = failures = 0
    hit_ms: list[float] = []
    miss_ms: list[float] = []
    per_worker: dict[str, set[str]] = {}
    counter = iter(range(o.jobs))
    try:
        async def caller() -> None:
            nonlocal hits, misses, failures
            for i in counter:
                model = models[i % 2]
                t0 = time.perf_counter()
                rec = await client.run(job_spec(model, prompt="hello", max_tokens=o.max_tokens, temperature=0),
                                       timeout=120)
                ms = (time.perf_counter() - t0) * 1000.0
                if rec.status != "completed":
                    failures += 1
                    continue
                per_worker.setdefault(rec.worker_id or "?", set()).add(model)
                if rec.timings.cache_hit:
                    hits += 1
                    hit_ms.append(ms)
                else:
                    misses += 1
                    miss_ms.append(ms)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(o.concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await client.close()
    total = hits + misses
    rate = 100.0 * hits / total if total else float("nan")
    ph, pm = percentiles(hit_ms), percentiles(miss_ms)
    print(f"warm hits: {hits}/{total} = {rate:.1f}% ({misses} loads; failures {failures}); "
          f"{total / elapsed:,.1f} jobs/s over {elapsed:.1f}s")
    print(f"round trip: warm p50 {ph['p50']:.1f} ms p99 {ph['p99']:.1f} ms; "
          f"cold p50 {pm['p50']:.1f} ms p99 {pm['p99']:.1f} ms")
    print("models each worker ran: " + "; ".join(f"{w}: {', '.join(sorted(m))}" for w, m in sorted(per_worker.items())))
    return {"warm_hit_pct": rate, "loads": float(misses), "failures": float(failures), "jobs_per_s": total / elapsed,
            "warm_p50_ms": ph["p50"], "cold_p50_ms": pm["p50"] if miss_ms else float("nan"),
            "median_ms": statistics.median(hit_ms + miss_ms) if total else float("nan")}


def bench_affinity(o: AffinityOptions) -> dict[str, float]:
    """A fresh local stack with ``o.workers`` one-model workers; the numbers."""
    with local_stack(workers=o.workers, slots=4, env={"MNEMOS_WORKER_MAX_LOADED_MODELS": "1"}) as stack:
        asyncio.run(_register_second_model(stack.settings))
        return asyncio.run(run_affinity(stack.settings, o))
