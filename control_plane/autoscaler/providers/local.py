"""The ``local`` provider: worker processes on this machine (the embedded default).

A cold start is mostly imports (torch, transformers, the runtimes: about a second and a
half here), so the provider keeps a *zygote*: ``mnemos zygote``, started once with the
autoscaler, has imported all of that and forks a worker on request (``launchers.zygote``).
A forked worker is ready in a fraction of the time a fresh process needs. Without a zygote
(``zygote=False``, or when it has died and is being replaced) a worker is a fresh
``mnemos worker`` process.

Workers outlive the autoscaler: each is in its own session, and the provider follows it
by a small file, ``<state_dir>/<pool>/<worker id>.json`` (pid and the process's start
time, so a reused pid is not mistaken for it). Another autoscaler that takes over finds
the same workers there. A worker's environment is the worker's share of the
autoscaler's own (:func:`mnemos.environment.child_env`) plus the pool's settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from control_plane.autoscaler.providers.base import ProvidedWorker, ProviderError, ProviderView, WorkerLaunch
from mnemos.embedded import die_with_parent
from mnemos.environment import child_env, passthrough_names
from mnemos.messages import PoolSpec

__all__ = ["LocalProvider", "stop_local_workers"]

log = logging.getLogger("mnemos.autoscaler.local")

_MNEMOS = [sys.executable, "-m", "launchers"]


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return bool(abs(proc.create_time() - created) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _popen_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A fresh ``mnemos worker`` process in its own session (returns at once)."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [*_MNEMOS, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


class _Zygote:
    """The pre-started ``mnemos zygote`` process and its line protocol."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.preload_s: float | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, timeout: float = 120.0) -> asyncio.subprocess.Process:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            return proc
        if proc is not None:
            log.warning("the zygote exited with %s; starting another", proc.returncode)
        proc = await asyncio.create_subprocess_exec(
            *_MNEMOS, "zygote", env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, preexec_fn=die_with_parent,
        )
        self.proc = proc
        try:
            ready = await asyncio.wait_for(self._line(proc), timeout)
        except (TimeoutError, ProviderError):
            await self.close()
            raise
        self.preload_s = float(ready.get("preload_s", 0.0))
        log.info("zygote %s ready (imports took %.2fs)", ready.get("pid"), self.preload_s)
        return proc

    @staticmethod
    async def _line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        raw = await proc.stdout.readline()
        if not raw:
            raise ProviderError("the zygote exited")
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            raise ProviderError(f"the zygote answered {raw!r}")
        return answer

    async def fork(self, worker_id: str, env: dict[str, str], log_path: Path) -> int:
        async with self._lock:
            proc = await self.ensure()
            assert proc.stdin is not None
            proc.stdin.write((json.dumps({"worker_id": worker_id, "env": env, "log": str(log_path)}) + "\n").encode())
            await proc.stdin.drain()
            try:
                answer = await asyncio.wait_for(self._line(proc), 30.0)
            except (TimeoutError, ProviderError, ValueError):
                # A late answer would pair with the next request: this zygote is done.
                await self.close(kill=True)
                raise
        if answer.get("worker_id") != worker_id or "pid" not in answer:
            await self.close(kill=True)
            raise ProviderError(f"the zygote could not start {worker_id}: {answer}")
        return int(answer["pid"])

    async def close(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        if kill:
            proc.kill()
        elif proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class LocalProvider:
    """Worker processes on this machine, forked from a pre-started zygote."""

    name = "local"

    def __init__(
        self,
        *,
        namespace: str,
        state_dir: Path,
        environ: Mapping[str, str] | None = None,
        zygote: bool = True,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.state_dir = state_dir
        source = dict(os.environ if environ is None else environ)
        #: The worker's share of this process's environment (never the autoscaler's own
        #: settings or credentials beyond what a worker gets from ``mnemos up``).
        self.base_env = child_env("worker", source, passthrough_names(source))
        self.use_zygote = zygote
        self.stop_grace_s = stop_grace_s
        self._zygote = _Zygote({**self.base_env, "PYTHONUNBUFFERED": "1"}) if zygote else None
        self._stopping: set[asyncio.Task[None]] = set()
        #: Fresh worker processes started here (not forked by the zygote), to reap.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def zygote_preload_s(self) -> float | None:
        """How long the zygote's imports took (what each forked worker is spared)."""
        return self._zygote.preload_s if self._zygote is not None else None

    def _dir(self, pool: str) -> Path:
        return self.state_dir / pool

    async def prepare(self) -> None:
        """Start the zygote now, so the first scale-up does not wait for its imports."""
        if self._zygote is not None:
            await self._zygote.ensure()

    async def start(self, launch: WorkerLaunch, count: int) -> list[str]:
        pool = launch.pool
        folder = self._dir(pool.name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProviderError(f"cannot keep track of workers in {folder}: {e}") from e
        started: list[str] = []
        for _ in range(count):
            began = time.time()
            worker_id, pid, log_path = await self._spawn(pool.name, launch.env)
            try:
                created = psutil.Process(pid).create_time()
                record = {"worker_id": worker_id, "pid": pid, "created": created, "started_at": began,
                          "log": str(log_path), "zygote": self._zygote is not None}
                tmp = folder / f".{worker_id}.tmp"
                tmp.write_text(json.dumps(record))
                tmp.replace(folder / f"{worker_id}.json")
            except psutil.NoSuchProcess:
                raise ProviderError(f"worker {worker_id} exited at once; see {log_path}") from None
            except OSError as e:  # not recorded: not left running unknown to every autoscaler
                _signal(pid, signal.SIGKILL)
                raise ProviderError(f"cannot record worker {worker_id} in {folder}: {e}") from e
            started.append(worker_id)
        return started

    async def _spawn(self, pool: str, pool_env: dict[str, str]) -> tuple[str, int, Path]:
        """(worker id, pid, log) of a new worker: forked from the zygote, else a fresh process.
        A fallback gets an id of its own (a zygote that timed out may still have forked one)."""
        try:
            (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProviderError(f"cannot write worker logs under {self.state_dir}: {e}") from e
        for from_zygote in ((True, False) if self._zygote is not None else (False,)):
            worker_id = f"{pool}-{secrets.token_hex(3)}"
            env = {**self.base_env, **pool_env, "MNEMOS_WORKER_ID": worker_id, "PYTHONUNBUFFERED": "1"}
            log_path = self.state_dir / "logs" / f"{worker_id}.log"
            if from_zygote:
                assert self._zygote is not None
                try:
                    return worker_id, await self._zygote.fork(worker_id, env, log_path), log_path
                except (ProviderError, OSError, TimeoutError, ValueError) as e:
                    log.warning("zygote fork of %s failed (%r); starting a fresh process", worker_id, e)
                    continue
            try:
                proc = _popen_worker(env, log_path)
            except OSError as e:
                raise ProviderError(f"cannot start a worker process: {e}") from e
            # Our child: reaped by poll() in list() (no thread waits for it).
            self._children[proc.pid] = proc
            return worker_id, proc.pid, log_path
        raise AssertionError("unreachable")

    def _entries(self, pool: str) -> list[tuple[Path, dict[str, Any]]]:
        folder = self._dir(pool)
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            data = _read(path)
            if data is not None:
                out.append((path, data))
        return out

    def _reap(self) -> None:
        """Collect the exit of the fresh processes started here (no zombie stays behind)."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    async def list(self, pool: PoolSpec) -> ProviderView:
        self._reap()
        workers = []
        for path, data in self._entries(pool.name):
            if not _alive(int(data.get("pid", 0)), float(data.get("created", 0.0))):
                path.unlink(missing_ok=True)  # it exited (drained, recycled or crashed)
                continue
            workers.append(ProvidedWorker(
                worker_id=str(data["worker_id"]), state="running",
                started_at=datetime.fromtimestamp(float(data["started_at"]), UTC),
                detail=f"pid {data['pid']}",
            ))
        return ProviderView(workers=workers)

    async def stop(self, pool: PoolSpec, worker_id: str) -> None:
        path = self._dir(pool.name) / f"{worker_id}.json"
        data = _read(path)
        if data is None:
            return
        pid, created = int(data.get("pid", 0)), float(data.get("created", 0.0))
        path.unlink(missing_ok=True)
        if _alive(pid, created):
            _signal(pid, signal.SIGTERM)  # a worker drains on SIGTERM
            # Not awaited here (a round must not wait on it): killed later if it hangs.
            task = asyncio.create_task(self._kill_if_alive(worker_id, pid, created), name=f"stop-{worker_id}")
            self._stopping.add(task)
            task.add_done_callback(self._stopped)

    async def _kill_if_alive(self, worker_id: str, pid: int, created: float) -> None:
        deadline = time.monotonic() + self.stop_grace_s
        while _alive(pid, created) and time.monotonic() < deadline:  # noqa: ASYNC110 - not always our child
            await asyncio.sleep(0.1)
            self._reap()
        if _alive(pid, created):
            log.warning("worker %s (pid %d) did not stop within %.0fs; killing it", worker_id, pid, self.stop_grace_s)
            _signal(pid, signal.SIGKILL)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        self._stopping.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stopping a worker failed: %r", task.exception())

    async def protect(self, pool: PoolSpec, busy: set[str], idle: set[str]) -> None:
        """Nothing takes a local worker away but the autoscaler itself."""

    async def release(self, pool: PoolSpec, worker_id: str) -> None:
        """Local workers are never taken away by anyone else: nothing to release."""

    async def close(self) -> None:
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=self.stop_grace_s + 1)
        if self._zygote is not None:
            await self._zygote.close()


def stop_local_workers(state_dir: Path, timeout: float = 90.0) -> int:
    """SIGTERM every worker the local provider runs under ``state_dir`` (they drain) and
    wait for them, SIGKILLing any still there after ``timeout``; how many there were.
    ``mnemos up`` calls it at shutdown, after the autoscaler has stopped."""
    procs: list[tuple[Path, int, float]] = []
    for path in state_dir.glob("*/*.json"):
        data = _read(path)
        if data is None:
            continue
        pid, created = int(data.get("pid", 0)), float(data.get("created", 0.0))
        if _alive(pid, created):
            _signal(pid, signal.SIGTERM)
            procs.append((path, pid, created))
        else:
            path.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while any(_alive(pid, c) for _, pid, c in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for path, pid, created in procs:
        if _alive(pid, created):
            log.warning("worker pid %d did not stop within %.0fs; killing it", pid, timeout)
            _signal(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
    return len(procs)
