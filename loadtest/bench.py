"""Benchmarks that print numbers (they assert nothing; the docs record what they printed).

``noop``: N no-op Python jobs submitted as fast as one client can (``jobs.run``, a window of
outstanding requests) and every result awaited -> jobs/s; then sequential submit-to-result
round trips -> p50/p95/p99 ms.

``stream``: tokens/s and time to first token of the demo model through the platform
(submit, stream the result subject) against in-process generation with the same runtime
code on the same tiny model.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.embedded import free_port
from mnemos.messages import ResultChunk
from launchers.up import LocalStack, UpOptions

__all__ = ["CpuUsage", "NoopOptions", "StreamOptions", "bench_noop", "bench_stream", "cpu_per_process",
           "local_stack", "percentiles"]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    qs = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"p50": qs[49], "p95": qs[94], "p99": qs[98]}


@contextmanager
def local_stack(workers: int = 1, slots: int = 256, data_dir: Path | None = None,
                gateway: bool = False, *, autoscale: bool = False, max_workers: int = 4,
                env: dict[str, str] | None = None, auth: bool = True) -> Iterator[LocalStack]:
    """A fresh file-backed stack (embedded NATS, control plane, workers, optionally the
    HTTP gateway) for one run. ``autoscale``: workers come from the autoscaler's pool
    ``local`` (``workers`` is its min), as with ``mnemos up``; ``auth``: NATS users per
    role, as with ``mnemos up`` (off: an open server, to measure what permissions cost)."""
    with tempfile.TemporaryDirectory(prefix="mnemos-bench-") as tmp:
        opts = UpOptions(data_dir=data_dir or Path(tmp), port=free_port(), workers=workers, worker_slots=slots,
                         gateway_port=free_port() if gateway else 0, autoscale=autoscale, max_workers=max_workers,
                         auth=auth,
                         # Free metrics ports: a benchmark must not collide with a `mnemos up`
                         # (9091, 9092...) running beside it.
                         extra_env={"MNEMOS_LOG_LEVEL": "WARNING", "MNEMOS_CP_METRICS_PORT": "0",
                                    "MNEMOS_WORKER_METRICS_PORT": "0", "MNEMOS_AUTOSCALER_METRICS_PORT": "0",
                                    **(env or {})})
        with LocalStack(opts) as stack:
            yield stack


@dataclass
class CpuUsage:
    """CPU seconds (user + system) each process of a stack spent over a stretch of a run."""

    seconds: dict[str, float] = field(default_factory=dict)

    def report(self, jobs: int) -> str:
        rows = [f"{name:15s} {cpu:6.2f} cpu-s  {cpu / jobs * 1e6:7.1f} us/job" for name, cpu in self.seconds.items()]
        return "CPU per process over the run (user + system):\n" + "\n".join(rows)


@contextmanager
def cpu_per_process(stack: LocalStack) -> Iterator[CpuUsage]:
    """Measure the CPU of nats-server, every child of ``stack`` and this process while the
    block runs (psutil's counters, so profiling costs nothing)."""
    import psutil

    procs = {"nats-server": psutil.Process(stack.nats.pid)} if stack.nats.pid else {}
    procs |= {c.name: psutil.Process(c.proc.pid) for c in stack.children if c.proc is not None}
    procs["load generator"] = psutil.Process()

    def snap() -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}

    usage = CpuUsage()
    before = snap()
    yield usage
    after = snap()
    usage.seconds = {name: after[name] - before[name] for name in procs}


@dataclass
class NoopOptions:
    jobs: int = 10_000
    window: int = 1024
    roundtrips: int = 500
    warmup: int = 200


async def bench_noop(settings: NatsSettings, o: NoopOptions) -> dict[str, float]:
    client = await Client.connect(settings, request_timeout=60)
    spec = job_spec("demo-fn:v1", function="noop", timeout_seconds=60)
    try:
        for _ in range(o.warmup):
            await client.run(spec)
        sem = asyncio.Semaphore(o.window)
        failures = 0

        async def one() -> None:
            nonlocal failures
            async with sem:
                record = await client.run(spec)
                if record.status != "completed":
                    failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(o.jobs)))
        elapsed = time.perf_counter() - t0
        rate = o.jobs / elapsed
        print(f"throughput: {o.jobs} no-op jobs in {elapsed:.2f}s = {rate:,.0f} jobs/s "
              f"(window {o.window}, failures {failures})")

        samples: list[float] = []
        for _ in range(o.roundtrips):
            t = time.perf_counter()
            record = await client.run(spec)
            samples.append((time.perf_counter() - t) * 1000.0)
            if record.status != "completed":
                failures += 1
        p = percentiles(samples)
        print(f"round trip ({o.roundtrips} sequential submit-to-result): p50 {p['p50']:.2f} ms, "
              f"p95 {p['p95']:.2f} ms, p99 {p['p99']:.2f} ms, max {max(samples):.2f} ms")
        return {"jobs_per_s": rate, **{f"{k}_ms": v for k, v in p.items()}, "failures": float(failures)}
    finally:
        await client.close()


@dataclass
class StreamOptions:
    runs: int = 10
    max_tokens: int = 200
    prompt: str = "the quick brown fox"


class _InProcess:
    """The same runtime code on the same tiny model, called directly (no platform)."""

    def __init__(self, o: StreamOptions) -> None:
        self.o = o
        self._tmp = tempfile.TemporaryDirectory()
        self.loaded: Any = None

    async def __aenter__(self) -> "_InProcess":
        import torch

        from mnemos.messages import ArtifactLocation, ModelRecord, utcnow
        from mnemos.runtime_config import TransformersConfig
        from neuron_runtime.config import WorkerSettings
        from neuron_runtime.runtimes.transformers import TransformersRuntime
        from registry.demo import build_demo_model

        torch.set_num_threads(WorkerSettings().torch_threads)  # what the worker uses
        model_dir = build_demo_model(Path(self._tmp.name) / "m")
        record = ModelRecord(family="demo-gpt2", version="v1", runtime="transformers",
                             artifact=ArtifactLocation(store="nats", bucket="-", prefix="-"), files=[],
                             total_size=0, created_at=utcnow())
        self.loaded = await TransformersRuntime().load(record, model_dir, TransformersConfig())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.loaded.unload()
        self._tmp.cleanup()

    async def once(self, i: int) -> tuple[float, float]:
        """(tokens/s, time to first token in ms) of one generation."""
        from neuron_runtime.runtimes.base import ExecutionContext

        spec = job_spec("demo-gpt2:v1", prompt=self.o.prompt, max_tokens=self.o.max_tokens, temperature=0)
        ctx = ExecutionContext(job_id=f"bench{i}", attempt=1, spec=spec)
        t0 = time.perf_counter()
        ctx.started = t0
        out = await self.loaded.run(ctx)
        return out.metadata["completion_tokens"] / (time.perf_counter() - t0), ctx.first_token_ms or 0.0


async def _through_platform_once(client: Client, o: StreamOptions) -> tuple[float, float]:
    """(tokens/s, time to first token in ms), submit to the final message, at the client."""
    spec = job_spec("demo-gpt2:v1", prompt=o.prompt, max_tokens=o.max_tokens, temperature=0)
    t0 = time.perf_counter()
    job = await client.submit(spec)
    first: float | None = None
    async for item in client.stream(job.job_id):
        if isinstance(item, ResultChunk) and first is None:
            first = time.perf_counter()
    elapsed = time.perf_counter() - t0
    record = await client.get(job.job_id)
    tokens = record.output.metadata["completion_tokens"] if record.output else 0
    return tokens / elapsed, ((first or t0) - t0) * 1000.0


async def bench_stream(settings: NatsSettings, o: StreamOptions) -> dict[str, float]:
    """Alternate in-process and through-platform generations (same machine state); medians."""
    client = await Client.connect(settings, request_timeout=60)
    try:
        async with _InProcess(o) as local:
            await local.once(-1)  # warm-up
            await _through_platform_once(client, o)  # the worker loads the model
            lr, lt, pr, pt = [], [], [], []
            for i in range(o.runs):
                rate, ttft = await local.once(i)
                lr.append(rate)
                lt.append(ttft)
                rate, ttft = await _through_platform_once(client, o)
                pr.append(rate)
                pt.append(ttft)
    finally:
        await client.close()
    local_rate, rate = statistics.median(lr), statistics.median(pr)
    local_ttft, ttft = statistics.median(lt), statistics.median(pt)
    print(f"in-process:     {local_rate:,.0f} tokens/s, first token {local_ttft:.1f} ms "
          f"(median of {o.runs}, {o.max_tokens} tokens, greedy)")
    print(f"through MNEMOS: {rate:,.0f} tokens/s, first token {ttft:.1f} ms "
          "(at the client: submit -> first chunk, submit -> final message)")
    print(f"streaming efficiency: {100.0 * rate / local_rate:.1f}% of in-process tokens/s")
    return {"local_tokens_per_s": local_rate, "platform_tokens_per_s": rate, "local_ttft_ms": local_ttft,
            "platform_ttft_ms": ttft}
