"""``bench generate``: total tokens/s of N concurrent generations on one loaded demo model.

The transformers runtime decodes concurrent requests for one model in a continuous batch
(``max_batch_size``). This loads the tiny demo model in-process with that runtime (as
``bench stream``'s in-process side does, with the worker's torch thread count), runs N
greedy generations of ``max_tokens`` each at once for N in ``streams`` and prints the
total tokens/s and its ratio to one stream. It also runs the widest N with
``max_batch_size=1`` (one generation at a time, the runtime before batching) for
comparison. Numbers only: it asserts nothing.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnemos.client import job_spec

__all__ = ["GenerateOptions", "bench_generate"]

#: Prompts of different lengths (1 to ~20 tokens), so batched rows are padded as in real use.
_PROMPTS = (
    "Hi",
    "The worker pulls a job from the queue",
    "Call me Ishmael.",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "Numbers like 0 1 2 3",
    "To be, or not to be, that is the question",
    "The rain in Spain",
    "Hello world! How are you today?",
)


@dataclass
class GenerateOptions:
    streams: tuple[int, ...] = (1, 2, 4, 8)
    max_tokens: int = 128
    #: Each N is measured this many times, interleaved with the others; medians are printed.
    rounds: int = 5
    max_batch_size: int = 8


async def _load(model_dir: Path, max_batch_size: int) -> Any:
    from mnemos.messages import ArtifactLocation, ModelRecord, utcnow
    from mnemos.runtime_config import TransformersConfig
    from neuron_runtime.runtimes.transformers import TransformersRuntime

    record = ModelRecord(family="demo-gpt2", version="v1", runtime="transformers",
                         artifact=ArtifactLocation(store="nats", bucket="-", prefix="-"), files=[],
                         total_size=0, created_at=utcnow())
    return await TransformersRuntime().load(record, model_dir, TransformersConfig(max_batch_size=max_batch_size))


async def _concurrent(loaded: Any, n: int, max_tokens: int) -> tuple[int, float]:
    """(tokens generated, seconds) for ``n`` generations started together."""
    from neuron_runtime.runtimes.base import ExecutionContext

    contexts = [
        ExecutionContext(job_id=f"gen{i}", attempt=1,
                         spec=job_spec("demo-gpt2:v1", prompt=_PROMPTS[i % len(_PROMPTS)], max_tokens=max_tokens,
                                       temperature=0))
        for i in range(n)
    ]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(loaded.run(ctx) for ctx in contexts))
    elapsed = time.perf_counter() - t0
    return sum(int(o.metadata["completion_tokens"]) for o in outs), elapsed


async def bench_generate(o: GenerateOptions) -> dict[str, float]:
    """Measure and print total tokens/s per number of concurrent streams."""
    import torch

    from neuron_runtime.config import WorkerSettings
    from registry.demo import build_demo_model

    threads = WorkerSettings().torch_threads
    torch.set_num_threads(threads)  # what the worker uses
    with tempfile.TemporaryDirectory(prefix="mnemos-bench-") as tmp:
        model_dir = build_demo_model(Path(tmp) / "m")
        batched = await _load(model_dir, o.max_batch_size)
        single = await _load(model_dir, 1)
        try:
            widest = max(o.streams)
            await _concurrent(batched, widest, 16)  # warm-up
            await _concurrent(single, 1, 16)
            rates: dict[int, list[float]] = {n: [] for n in o.streams}
            unbatched: list[float] = []
            for _ in range(o.rounds):
                for n in o.streams:
                    tokens, elapsed = await _concurrent(batched, n, o.max_tokens)
                    rates[n].append(tokens / elapsed)
                tokens, elapsed = await _concurrent(single, widest, o.max_tokens)
                unbatched.append(tokens / elapsed)
        finally:
            await batched.unload()
            await single.unload()

    print(f"demo model in-process, greedy, {o.max_tokens} tokens per stream, max_batch_size {o.max_batch_size}, "
          f"{threads} torch thread(s), median of {o.rounds} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
    base = statistics.median(rates[min(o.streams)])
    result: dict[str, float] = {}
    for n in o.streams:
        rate = statistics.median(rates[n])
        print(f"{n:>3} stream(s): {rate:8,.0f} tokens/s total, {rate / n:6,.0f} per stream, "
              f"{rate / base:5.2f}x {min(o.streams)} stream(s)")
        result[f"tokens_per_s_{n}"] = rate
        result[f"ratio_{n}"] = rate / base
    one_at_a_time = statistics.median(unbatched)
    print(f"{widest:>3} stream(s), max_batch_size 1 (one at a time): {one_at_a_time:8,.0f} tokens/s total")
    result[f"tokens_per_s_{widest}_unbatched"] = one_at_a_time
    return result
