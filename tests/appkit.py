"""The app the app and actor tests deploy (``app_stack`` in conftest deploys it)."""

from __future__ import annotations

import textwrap
from pathlib import Path

APP = '''
import asyncio
import ctypes
import os
import time

import mnemos

app = mnemos.App("calc", requirements=REQUIREMENTS)


@app.function(timeout=30, max_concurrency=8)
def add(a: int, b: int = 0) -> int:
    return a + b


@app.function(max_concurrency=8)
def pid() -> int:
    return os.getpid()


@app.function(max_concurrency=8)
def maybe_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * 10


@app.function(max_concurrency=8)
def words(n: int):
    for i in range(n):
        yield f"w{i}"


@app.function(max_concurrency=8)
async def ticks(n: int):
    for i in range(n):
        await asyncio.sleep(0)
        yield {"tick": i}


@app.function(max_concurrency=8, timeout=300)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.function(max_concurrency=8, timeout=1)
def hang() -> None:
    time.sleep(120)


@app.function(max_concurrency=8)
def crash(how: str) -> None:
    if how == "segfault":
        ctypes.string_at(0)  # a real segmentation fault, as a broken extension has
    os._exit(3)


@app.function()
def version() -> str:
    return VERSION


@app.function(retries=2)
def flaky(marker: str) -> str:
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("the first attempt fails")
    return "second time lucky"


@app.cls(gpu="any")
class NeedsGpu:
    @mnemos.method()
    def run(self) -> str:
        return "ran on a GPU"


@app.cls(max_concurrency=16)
class Model:
    @mnemos.enter()
    def load(self) -> None:
        time.sleep(0.3)
        self.entered = getattr(self, "entered", 0) + 1
        self.factor = 10

    @mnemos.method()
    def scale(self, x: int) -> list[int]:
        return [x * self.factor, self.entered, os.getpid()]

    @mnemos.batched(max_batch_size=8, wait_ms=30000)
    def batch(self, xs: list[int]) -> list[int]:
        return [x + 1000 * len(xs) for x in xs]


@app.actor(idle_timeout=300)
class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.seen: list[int] = []

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def append(self, x: int) -> int:
        self.seen.append(x)
        return len(self.seen)

    def log(self) -> list[int]:
        return self.seen

    def where(self) -> int:
        return os.getpid()

    async def nap(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        self.n += 1
        return self.n


@app.actor(checkpoint_interval=120)
class Lazy:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


@app.actor(idle_timeout=1)
class Brief:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n
'''


def write_app(directory: Path, *, version: str = "v1", requirements: list[str] | None = None,
              extra: str = "") -> Path:
    source = APP.replace("REQUIREMENTS", repr(requirements or [])) + f"\nVERSION = {version!r}\n" + extra
    path = directory / "calc_app.py"
    path.write_text(textwrap.dedent(source))
    return path
