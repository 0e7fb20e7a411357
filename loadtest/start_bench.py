"""``bench workerstart``: a worker process from its start to ready, fresh and forked.

Ready is the worker's first ``idle`` record: registered, its consumers bound, able to take
work (what the autoscaler waits for). Each run starts one worker against an embedded
nats-server with nothing else running and times it from just before the process is asked
for (``Popen``, or the request line written to the zygote) to that record's time, then
stops it (SIGTERM, drained) before the next run.

- **fresh**: ``python -m launchers worker``, a new interpreter that imports what it needs.
- **zygote**: forked by ``mnemos zygote`` (``launchers/zygote.py``), which imported torch,
  transformers and the runtimes once, before the runs (the ``local`` provider's path).
"""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nats

from mnemos.config import NatsSettings
from mnemos.embedded import EmbeddedNats, free_port
from mnemos.layout import ensure_layout
from mnemos.messages import WorkerRecord, decode
from mnemos.names import Names

__all__ = ["StartOptions", "bench_workerstart"]

_MNEMOS = [sys.executable, "-m", "launchers"]


@dataclass
class StartOptions:
    runs: int = 5
    #: Also time workers forked from a zygote.
    zygote: bool = True


async def _ready_at(settings: NatsSettings, worker_id: str, timeout: float = 60.0) -> float:
    """The time (epoch seconds) of ``worker_id``'s first ``idle`` record."""
    names = Names(settings.namespace)
    nc = await nats.connect(settings.servers, name="bench-workerstart")
    try:
        layout = await ensure_layout(nc.jetstream(), names)
        watcher = await layout.workers.watch(worker_id)
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                rec = decode(entry.value, WorkerRecord)
                if rec.status == "idle":
                    await watcher.stop()  # type: ignore[no-untyped-call]
                    return rec.last_heartbeat.timestamp()
        raise TimeoutError
    finally:
        await nc.close()


async def _make_layout(settings: NatsSettings) -> None:
    nc = await nats.connect(settings.servers)
    try:
        await ensure_layout(nc.jetstream(), Names(settings.namespace))
    finally:
        await nc.close()


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # our child (fresh): reap it; a zygote's child is reaped by the system
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


class _ZygoteProc:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*_MNEMOS, "zygote"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout
        self.preload_s = float(json.loads(self.stdout.readline())["preload_s"])

    def fork(self, worker_id: str, env: dict[str, str], log: Path) -> int:
        self.stdin.write(json.dumps({"worker_id": worker_id, "env": env, "log": str(log)}) + "\n")
        self.stdin.flush()
        return int(json.loads(self.stdout.readline())["pid"])

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(10)


def _compile_bytecode() -> None:
    """Compile MNEMOS's modules, as ``pip install`` does for an image: the editable dev
    install leaves it to the first import, which skips it under ``PYTHONDONTWRITEBYTECODE``
    (and then every start compiles every module again)."""
    import launchers

    root = Path(launchers.__file__).resolve().parent.parent
    for package in ("mnemos", "control_plane", "neuron_runtime", "registry", "launchers"):
        compileall.compile_dir(root / package, quiet=1)


def bench_workerstart(o: StartOptions) -> dict[str, float]:
    """Run the fresh and (``o.zygote``) forked starts; medians, minima and maxima in ms."""
    _compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="mnemos-start-") as tmp:
        root = Path(tmp)
        server = EmbeddedNats(store_dir=root / "nats", port=free_port(), log_file=root / "nats.log")
        server.start()
        try:
            settings = NatsSettings(nats_url=server.url, namespace="mnemos")
            base = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOS_")}
            base.update({"MNEMOS_NATS_URL": server.url, "MNEMOS_NAMESPACE": settings.namespace,
                         "MNEMOS_WORKER_METRICS_PORT": "-1", "MNEMOS_LOG_LEVEL": "WARNING",
                         "MNEMOS_WORKER_CACHE_DIR": str(root / "cache")})
            asyncio.run(_make_layout(settings))
            results: dict[str, list[float]] = {"fresh": []}
            for i in range(o.runs):
                env = {**base, "MNEMOS_WORKER_ID": f"fresh-{i}"}
                t0 = time.time()
                proc = subprocess.Popen([*_MNEMOS, "worker"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(root / f"fresh-{i}.log", "wb"))  # noqa: SIM115
                ready = asyncio.run(_ready_at(settings, f"fresh-{i}"))
                results["fresh"].append(ready - t0)
                _stop(proc.pid)
            if o.zygote:
                zygote = _ZygoteProc(base)
                results["zygote"] = []
                try:
                    for i in range(o.runs):
                        worker_id = f"forked-{i}"
                        t0 = time.time()
                        pid = zygote.fork(worker_id, {**base, "MNEMOS_WORKER_ID": worker_id},
                                          root / f"{worker_id}.log")
                        ready = asyncio.run(_ready_at(settings, worker_id))
                        results["zygote"].append(ready - t0)
                        _stop(pid)
                finally:
                    zygote.close()
        finally:
            server.stop()
    out: dict[str, float] = {}
    for kind, samples in results.items():
        ms = [s * 1000.0 for s in samples]
        out[f"{kind}_median_ms"] = statistics.median(ms)
        out[f"{kind}_min_ms"] = min(ms)
        out[f"{kind}_max_ms"] = max(ms)
        print(f"{kind:7s} process start -> ready: median {statistics.median(ms):.0f} ms "
              f"(min {min(ms):.0f}, max {max(ms):.0f}; {len(ms)} runs)")
    return out
