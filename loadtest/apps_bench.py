"""``bench actor`` and ``bench batch``: actor calls against Ray's, and what batching buys.

``bench actor``: one actor of a small app (``loadtest/bench_app.py``), no-op method:
``--n`` calls with ``--window`` in flight (Ray's ``tput``: submit all, then wait) and
``--roundtrips`` sequential calls (``lat``: p50/p95/p99 ms), the figures
``../shared/peers/bench_ray.py --mode actor --conc 1`` prints for Ray.

``bench batch``: ``--callers`` concurrent callers embed texts with the demo app's
``Generator.embed`` (``@mnemos.batched(max_batch_size=8, wait_ms=10)``) and then with
``embed_one`` (the same model call, one text per forward pass): calls per second of each
and the speed-up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchers.deploy import deploy, load_app_file
from launchers.up import DEMO_APP
from loadtest.bench import percentiles
from mnemos.app import configure
from mnemos.client import Client
from mnemos.config import NatsSettings

__all__ = ["ActorOptions", "BatchOptions", "bench_actor", "bench_batch", "BENCH_APP"]

BENCH_APP = Path(__file__).resolve().parent / "bench_app.py"


@dataclass
class ActorOptions:
    n: int = 20_000
    window: int = 256
    roundtrips: int = 500
    warmup: int = 500


async def bench_actor(settings: NatsSettings, o: ActorOptions) -> dict[str, Any]:
    await deploy(settings, BENCH_APP)
    client = await Client.connect(settings)
    try:
        def call() -> Any:
            return client.call_actor("bench", "Echo", "one", "noop", [], {})

        started = time.perf_counter()
        await call()  # activated: the first call pays for it
        activation_s = time.perf_counter() - started
        for _ in range(o.warmup):
            await call()
        gate = asyncio.Semaphore(o.window)

        async def one() -> None:
            async with gate:
                await call()

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(o.n)))
        wall = time.perf_counter() - t
        samples = []
        for _ in range(o.roundtrips):
            t0 = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t0) * 1000.0)
    finally:
        await client.close()
    lat = percentiles(samples)
    result = {"peer": "mnemos-actor", "n": o.n, "window": o.window, "tput": o.n / wall, "wall_s": wall,
              "activation_s": activation_s, "lat": lat}
    print(f"actor calls: {result['tput']:,.0f}/s ({o.n} calls, {o.window} in flight); sequential round trip "
          f"p50 {lat['p50']:.3f} ms  p95 {lat['p95']:.3f} ms  p99 {lat['p99']:.3f} ms; first call (activation) "
          f"{activation_s * 1000:.0f} ms")
    return result


@dataclass
class BatchOptions:
    callers: int = 8
    calls: int = 50  # per caller and method
    warmup: int = 16


async def bench_batch(settings: NatsSettings, o: BatchOptions) -> dict[str, Any]:
    configure(settings)
    try:
        demo = load_app_file(DEMO_APP).module
        generator = demo.Generator()
        text = "The worker pulls a job from the queue and streams every token back."
        await asyncio.gather(*(generator.embed.remote.aio(text) for _ in range(o.warmup)))
        await generator.embed_one.remote.aio(text)
        out: dict[str, Any] = {"callers": o.callers, "calls_per_caller": o.calls}
        for name in ("embed_one", "embed"):
            method = getattr(generator, name)

            async def caller(m: Any = method) -> None:
                for _ in range(o.calls):
                    await m.remote.aio(text)

            t = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(o.callers)))
            out[f"{name}_per_s"] = o.callers * o.calls / (time.perf_counter() - t)
    finally:
        configure(None)
    out["speedup"] = out["embed_per_s"] / out["embed_one_per_s"]
    print(f"{o.callers} callers x {o.calls} calls: embed_one {out['embed_one_per_s']:.0f} calls/s, "
          f"embed (batched, max 8 / 10 ms) {out['embed_per_s']:.0f} calls/s: {out['speedup']:.2f}x")
    return out
