"""The worker's side of an app process: start it, send it calls, stop or replace it.

One :class:`AppHost` per app version holds at most one child process
(:mod:`neuron_runtime.app_child`), shared by every function and class of the version
(the pool's entries for them are :class:`AppCall` handles on it). The child is started
when the first handle loads and again for the next call after it died; that call's job
counts the start as its load time. A cancel or timeout asks the child to stop the call;
if the call has not stopped within :data:`KILL_GRACE_S` (a plain function cannot be
interrupted in its thread), the child is killed: the calls it held end with
``execution_error`` (retried as their policy says) and the next call gets a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec

from mnemos.errors import ExecutionError, JobCancelled, MnemosError, ModelLoadError, ValidationFailed, from_info
from mnemos.messages import ErrorInfo, JobOutput, ModelRecord
from mnemos.runtime_config import PythonConfig
from neuron_runtime.app_protocol import (
    Activate,
    Call,
    Cancel,
    Cancelled,
    Deactivated,
    Done,
    Failed,
    Item,
    PathReply,
    PathRequest,
    Ready,
    read_frame,
    write_frame,
)
from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel

__all__ = ["AppHost", "AppCall", "AppServices", "ensure_env", "KILL_GRACE_S"]

log = logging.getLogger("mnemos.app_host")

#: How long a cancelled or timed-out call gets to stop before its app process is killed.
KILL_GRACE_S = 1.0
#: How long an app process may take to import the app's file.
START_TIMEOUT_S = 120.0


class AppServices(Protocol):
    """What a host needs of the worker: its disk cache (the app's files, models that app
    code asks for, the cached environments) and its model catalog."""

    @property
    def root(self) -> Path: ...

    def checkout(self, record: ModelRecord) -> AbstractAsyncContextManager[Any]: ...

    async def resolve(self, name: str) -> ModelRecord: ...

    @property
    def nats_env(self) -> dict[str, str]:
        """``MNEMOS_*`` variables for the child's own NATS connection (its actors)."""
        ...


class _Died:
    """Put on a call's queue when its process ended."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "was lost"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def ensure_env(root: Path, requirements: list[str]) -> Path | None:
    """The directory holding ``requirements`` installed (``pip install --target``), built
    once per set of requirements and shared by the worker's app processes (and by workers
    sharing the cache directory: a file lock orders them). None: nothing to install."""
    if not requirements:
        return None
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    envs = root / ".app-envs"
    final = envs / key
    if (final / ".complete").exists():
        return final
    envs.mkdir(parents=True, exist_ok=True)

    def lock() -> int:
        fd = os.open(envs / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    fd = await asyncio.to_thread(lock)
    try:
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=envs))
        (tmp / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
            "--target", str(tmp), "-r", str(tmp / "requirements.txt"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = out.decode(errors="replace").strip()[-2000:]
            raise ModelLoadError(f"installing the app's requirements failed: {tail}", retryable=False,
                                 details={"requirements": requirements})
        await asyncio.to_thread(_commit_env, tmp, final)
        log.info("installed app requirements %s in %.1f s", requirements, time.perf_counter() - started)
        return final
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _commit_env(tmp: Path, final: Path) -> None:
    (tmp / ".complete").write_text("ok\n", encoding="utf-8")
    if final.exists():  # a half-made one (no .complete): another worker died making it
        shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


class _Process:
    """One running child and its socket."""

    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.reading: asyncio.Task[None] | None = None
        self.calls: dict[int, asyncio.Queue[Any]] = {}
        self.dead: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class AppHost:
    """The app process of one app version on this worker."""

    def __init__(self, record: ModelRecord, config: PythonConfig, services: AppServices | None) -> None:
        self.record = record
        self.config = config
        self.services = services
        self.refs = 0
        self._process: _Process | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pins = contextlib.AsyncExitStack()
        self._directory: Path | None = None
        self._env: Path | None = None
        self._paths: dict[str, str] = {}
        self.starts = 0
        #: Tokens of the actors the child hosts (they keep the host, as handles do).
        self.actors: set[str] = set()
        #: Called when the host may have become unused (an actor went away).
        self.on_release: Callable[[AppHost], Coroutine[Any, Any, None]] | None = None

    @property
    def pid(self) -> int | None:
        p = self._process
        return p.pid if p is not None and p.dead is None else None

    async def prepare(self, model_dir: Path | None) -> None:
        """Keep the app's files and environment for this host's life (the pool's load)."""
        if self.services is not None:
            cached = await self._pins.enter_async_context(self.services.checkout(self.record))
            self._directory = Path(cached.path)
            self._env = await ensure_env(self.services.root, self.config.requirements)
        else:
            if model_dir is None:
                raise ModelLoadError(f"no directory for {self.record.name}: the runtime is not attached to a worker")
            self._directory = Path(model_dir)
            self._env = await ensure_env(Path(tempfile.gettempdir()) / "mnemos", self.config.requirements)

    async def ensure_started(self) -> float | None:
        """Start the child unless it runs; the milliseconds a start took (None: it ran)."""
        if self._process is not None and self._process.dead is None:
            return None
        async with self._starting:
            if self._process is not None and self._process.dead is None:
                return None
            started = time.perf_counter()
            self._process = await self._spawn()
            return (time.perf_counter() - started) * 1000.0

    async def _spawn(self) -> _Process:
        assert self._directory is not None, "prepare() first"
        module, _, variable = self.config.entrypoint.rpartition(":")
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        if self.services is not None:
            env.update(self.services.nats_env)
        if self._env is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self._env), env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "neuron_runtime.app_child", "--fd", str(child_sock.fileno()),
                "--dir", str(self._directory), "--file", module, "--app", variable,
                pass_fds=[child_sock.fileno()], env=env, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
            first = await asyncio.wait_for(read_frame(reader, parent=True), START_TIMEOUT_S)
        except BaseException as e:  # timed out, or the start was cancelled (a drain): no orphan
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            parent_sock.close()
            if isinstance(e, TimeoutError):
                raise ModelLoadError(f"the app process of {self.record.name} did not start within "
                                     f"{START_TIMEOUT_S:g}s", retryable=True) from None
            raise
        process = _Process(proc, reader, writer)
        if not isinstance(first, Ready):
            code = await proc.wait()
            if isinstance(first, Failed):
                raise ModelLoadError(first.message, retryable=False, details={"traceback": first.traceback})
            raise ModelLoadError(f"the app process of {self.record.name} {_describe_exit(code)} while starting",
                                 retryable=False)
        self.starts += 1
        process.reading = asyncio.create_task(self._read(process), name=f"app-{self.record.name}-{proc.pid}")
        log.info("app process %d of %s up (import %.0f ms)", proc.pid, self.record.name, first.import_ms)
        return process

    async def _read(self, process: _Process) -> None:
        """Route the child's frames to their calls until it ends; then fail what it held."""
        reason = "ended"
        try:
            while (frame := await read_frame(process.reader, parent=True)) is not None:
                if isinstance(frame, PathRequest):
                    asyncio.create_task(self._answer_path(process, frame), name=f"app-path-{frame.id}")
                    continue
                if isinstance(frame, Deactivated):
                    self.actors.discard(frame.token)
                    self._released()
                    continue
                queue = process.calls.get(frame.id)
                if queue is not None:
                    queue.put_nowait(frame)
        except Exception as e:  # noqa: BLE001 - a broken frame: this process cannot be trusted
            log.error("app process %d of %s sent a bad frame (%r); killing it", process.pid, self.record.name, e)
            reason = f"sent a bad frame ({e})"
            with contextlib.suppress(ProcessLookupError):
                process.proc.kill()
        code = await process.proc.wait()
        process.dead = reason if reason != "ended" else _describe_exit(code)
        process.writer.close()
        if process.calls:
            log.warning("app process %d of %s %s with %d calls running", process.pid, self.record.name,
                        process.dead, len(process.calls))
        for queue in process.calls.values():
            queue.put_nowait(_Died(process.dead))
        if self.actors:  # they died with it; the next call activates them elsewhere
            log.warning("app process %d of %s %s: its actors %d are gone", process.pid, self.record.name,
                        process.dead, len(self.actors))
            self.actors.clear()
            self._released()

    def _released(self) -> None:
        if self.on_release is not None:
            asyncio.create_task(self._release_now(self.on_release), name=f"app-release-{self.record.name}")

    async def _release_now(self, release: Callable[[AppHost], Coroutine[Any, Any, None]]) -> None:
        try:
            await release(self)
        except Exception:
            log.exception("stopping the unused app process of %s failed", self.record.name)

    async def _answer_path(self, process: _Process, frame: PathRequest) -> None:
        reply = PathReply(id=frame.id)
        try:
            reply = PathReply(id=frame.id, path=await self._model_path(frame.model))
        except MnemosError as e:
            reply = PathReply(id=frame.id, error=f"{e.code}: {e.message}")
        except Exception as e:  # noqa: BLE001 - told to the app code, which raises it
            log.warning("model path %s for %s failed", frame.model, self.record.name, exc_info=True)
            reply = PathReply(id=frame.id, error=f"{type(e).__name__}: {e}")
        if process.dead is None:
            write_frame(process.writer, reply)

    async def _model_path(self, name: str) -> str:
        if name in self._paths:
            return self._paths[name]
        if self.services is None:
            raise ModelLoadError("this worker has no disk cache to fetch models into")
        record = await self.services.resolve(name)
        cached = await self._pins.enter_async_context(self.services.checkout(record))
        self._paths[name] = str(cached.path)
        return self._paths[name]

    async def run(self, ctx: ExecutionContext, target: str) -> JobOutput:
        """One call of ``target`` for ``ctx``'s job: its items streamed, its result returned."""
        restart_ms = await self.ensure_started()
        process = self._process
        assert process is not None
        call_id = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        process.calls[call_id] = queue
        spec = ctx.spec.input
        write_frame(process.writer, Call(id=call_id, target=target, args=list(spec.args), kwargs=dict(spec.kwargs)))
        watcher = asyncio.create_task(self._stop_when_cancelled(ctx, process, call_id), name=f"app-stop-{call_id}")
        try:
            while True:
                frame = await queue.get()
                if isinstance(frame, Item):
                    if isinstance(frame.value, str):
                        ctx.emit(frame.value)
                    else:
                        ctx.emit("", frame.value)
                    continue
                break
        finally:
            watcher.cancel()
            process.calls.pop(call_id, None)
        if isinstance(frame, Done):
            load_ms = (restart_ms or 0.0) + (frame.load_ms or 0.0)
            ctx.load_ms = load_ms if (restart_ms is not None or frame.load_ms is not None) else None
            metadata: dict[str, Any] = {"function": target, "model": self.record.name, "app_pid": process.pid}
            if frame.batch_size is not None:
                metadata.update(batch_size=frame.batch_size, batch_id=f"{process.pid}-{frame.batch_id}")
            return JobOutput(result=frame.result, metadata=metadata, metrics={"execution_ms": frame.exec_ms})
        if isinstance(frame, Cancelled) or (isinstance(frame, _Died) and ctx.cancel_flag.is_set()):
            raise JobCancelled(f"job {ctx.job_id} was cancelled")
        if isinstance(frame, Failed):
            details = {"traceback": frame.traceback, "exception_type": frame.exception_type, "app_pid": process.pid}
            if frame.code == "validation_error":
                raise ValidationFailed(frame.message)
            raise from_info(ErrorInfo(code=frame.code, message=frame.message, retryable=frame.retryable,
                                      details={k: v for k, v in details.items() if v}))
        assert isinstance(frame, _Died)
        raise ExecutionError(f"the app process of {self.record.name} {frame.reason} while running {target}",
                             retryable=True, details={"app_pid": process.pid})

    async def activate(self, activation: Activate) -> int:
        """Hand an actor to the child; the pid that serves it."""
        await self.ensure_started()
        process = self._process
        assert process is not None
        call_id = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        process.calls[call_id] = queue
        self.actors.add(activation.token)
        try:
            write_frame(process.writer, msgspec.structs.replace(activation, id=call_id))
            frame = await queue.get()
        finally:
            process.calls.pop(call_id, None)
        if isinstance(frame, Done):
            return int(frame.result)
        self.actors.discard(activation.token)
        if isinstance(frame, Failed):
            raise from_info(ErrorInfo(code=frame.code, message=frame.message, retryable=frame.retryable,
                                      details={"traceback": frame.traceback} if frame.traceback else {}))
        raise ExecutionError(f"the app process of {self.record.name} {getattr(frame, 'reason', 'failed')} "
                             f"while activating {activation.cls}")

    async def _stop_when_cancelled(self, ctx: ExecutionContext, process: _Process, call_id: int) -> None:
        """On cancel or timeout: ask the child to stop the call; kill it if it does not."""
        await ctx.cancelled.wait()
        if process.dead is not None:
            return
        write_frame(process.writer, Cancel(id=call_id))
        await asyncio.sleep(KILL_GRACE_S)
        if call_id in process.calls and process.dead is None:
            log.warning("job %s: call did not stop within %.1f s; killing app process %d of %s", ctx.job_id,
                        KILL_GRACE_S, process.pid, self.record.name)
            with contextlib.suppress(ProcessLookupError):
                process.proc.kill()

    async def close(self) -> None:
        """Stop the child (its socket closes: it exits; killed if it does not) and unpin."""
        process, self._process = self._process, None
        if process is not None and process.dead is None:
            process.writer.close()
            try:
                await asyncio.wait_for(process.proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.proc.kill()
        if process is not None and process.reading is not None:
            await asyncio.wait({process.reading}, timeout=5.0)
        await self._pins.aclose()


class AppCall(LoadedModel):
    """The pool's entry for one function or method of an app: a handle on its host."""

    max_concurrency = 1024  # the app process limits each definition to its max_concurrency
    merge_stream = False

    def __init__(self, record: ModelRecord, config: PythonConfig, host: AppHost,
                 release: "AppRelease") -> None:
        self.record = record
        self.config = config
        self.host = host
        self.target = config.target.rpartition(":")[2]
        self._release = release

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        if ctx.cancel_flag.is_set():
            raise JobCancelled(f"job {ctx.job_id} was cancelled before it started")
        return await self.host.run(ctx, self.target)

    async def abort(self, ctx: ExecutionContext) -> None:
        ctx.cancel()  # the host's watcher stops the call (or kills the process)

    async def unload(self) -> None:
        await self._release(self.host)


class AppRelease(Protocol):
    async def __call__(self, host: AppHost) -> None: ...
