"""The app process: one per app version on a worker, running the user's code.

``python -m neuron_runtime.app_child --fd N --dir DIR --file app.py --app app`` imports the
app's file from its (cached) directory, finds the :class:`mnemos.App` and serves the calls
the worker sends over the socket ``N`` (:mod:`neuron_runtime.app_protocol`):

- a class is instantiated, and its ``@mnemos.enter`` methods run, once, before its first
  call; the calls that waited for it report the time as their load time;
- a definition runs at most ``max_concurrency`` calls at once (a plain function in a thread
  of its own, a coroutine on the loop, a generator's items streamed as they come);
- a ``@mnemos.batched`` method gathers the calls made within ``wait_ms`` of the first (up to
  ``max_batch_size``) and runs them as one call with a list per parameter;
- a cancel stops the call: a coroutine at once, a generator at its next item, a plain
  function only when it returns (the worker kills this process if that takes too long).

A crash here (an exception escaping everything, a segfault in an extension) ends this
process only; the worker fails the calls it held and starts a new one for the next call.
When the worker goes away (end of the socket), this process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import mnemos.app as mnemos_app
from mnemos.app import App, Cls, Function, load_module
from mnemos.errors import MnemosError
from mnemos.messages import AppDefinition, AppMethod
from mnemos.sync import LoopThread
from neuron_runtime.app_actors import ActorHost
from neuron_runtime.app_protocol import (
    Activate,
    FrameTooLarge,
    Call,
    Cancel,
    Cancelled,
    Done,
    Failed,
    Item,
    PathReply,
    PathRequest,
    Ready,
    read_frame,
    write_frame,
)

_json = msgspec.json.Encoder()


class _UserError(Exception):
    """A failure to report with a code of its own (not the user code's exception)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


def _check_json(value: Any, what: str) -> None:
    try:
        _json.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError) as e:
        raise _UserError("execution_error", f"{what} is not JSON-encodable ({type(value).__name__}): {e}") from e


def load_app(directory: Path, file: str, variable: str) -> App:
    """Import ``file`` from ``directory`` under a module name of its own and return its App."""
    path = (directory / file).resolve()
    module = load_module(path, "mnemos_app_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem))
    app = getattr(module, variable, None)
    if not isinstance(app, App):
        raise ImportError(f"{file} has no mnemos.App named {variable!r}")
    return app


@dataclass
class _Instance:
    """A class's one instance in this process, entered once."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    value: Any = None


@dataclass
class _Pending:
    args: list[Any]
    future: asyncio.Future[tuple[Any, int, int]]


class _Batcher:
    """Gathers calls of one batched method and runs them together."""

    def __init__(self, child: "Child", method: AppMethod) -> None:
        self.child = child
        self.method = method
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.ids = itertools.count(1)

    async def submit(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, int, int]:
        """This call's own result, with its batch's size and id."""
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        try:
            bound = inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as e:
            raise _UserError("validation_error", f"arguments do not match {self.method.name}: {e}") from e
        bound.apply_defaults()
        values = [bound.arguments[p.name] for p in params]
        future: asyncio.Future[tuple[Any, int, int]] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Pending(values, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(fn), name=f"batch-{self.method.name}")
        return await future

    async def _run(self, fn: Callable[..., Any]) -> None:
        loop = asyncio.get_running_loop()
        while not self.queue.empty():
            batch = [self.queue.get_nowait()]
            deadline = loop.time() + self.method.wait_ms / 1000.0
            while len(batch) < self.method.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]  # cancelled while waiting
            if batch:
                await self._one(fn, batch, next(self.ids))

    async def _one(self, fn: Callable[..., Any], batch: list[_Pending], batch_id: int) -> None:
        columns = [list(col) for col in zip(*(p.args for p in batch), strict=True)]
        try:
            if inspect.iscoroutinefunction(fn):
                out = await fn(*columns)
            else:
                out = await self.child.in_thread(fn, columns, {})
            if not isinstance(out, list | tuple) or len(out) != len(batch):
                raise _UserError("execution_error", f"batched method {self.method.name} returned "
                                 f"{type(out).__name__} for {len(batch)} inputs; it must return a list of "
                                 f"{len(batch)} results")
        except BaseException as e:  # noqa: BLE001 - every call of the batch gets it
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            if not isinstance(e, Exception):
                raise
            return
        for p, value in zip(batch, out, strict=True):
            if not p.future.done():
                p.future.set_result((value, len(batch), batch_id))


class Child:
    """Serves one app's calls until the worker closes the socket."""

    def __init__(self, sock: socket.socket, app: App) -> None:
        self.sock = sock
        self.app = app
        self.writer: asyncio.StreamWriter | None = None
        self.loop = asyncio.get_running_loop()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stops: dict[int, threading.Event] = {}
        self.instances: dict[str, _Instance] = {}
        self.limits: dict[str, asyncio.Semaphore] = {
            d.name: asyncio.Semaphore(d.max_concurrency) for d in app.definitions}
        self.batchers: dict[str, _Batcher] = {}
        self.paths: dict[int, asyncio.Future[PathReply]] = {}
        self.path_ids = itertools.count(1)
        self.threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix="app")
        self._actors: ActorHost | None = None
        self._actor_loop: LoopThread | None = None

    def send(self, frame: Any) -> None:
        if self.writer is not None and not self.writer.is_closing():
            try:
                write_frame(self.writer, frame)
            except FrameTooLarge as e:  # a result or item too big to carry: that call fails, alone
                self.send(Failed(id=frame.id, code="validation_error", message=f"the {type(frame).__name__.lower()} "
                                 f"of call {frame.id} is too large to send ({e})"))
                task = self.tasks.get(frame.id)
                if task is not None:
                    task.cancel()
            except (ConnectionError, RuntimeError):
                pass  # the worker is gone: the serve loop ends at its next read

    async def serve(self, import_ms: float) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        mnemos_app._model_path_hook = self.model_path
        self.send(Ready(pid=os.getpid(), import_ms=import_ms))
        while (frame := await self._next(reader)) is not None:
            if isinstance(frame, Call):
                self.tasks[frame.id] = asyncio.create_task(self.call(frame), name=f"call-{frame.id}")
            elif isinstance(frame, Cancel):
                self.cancel(frame.id)
            elif isinstance(frame, Activate):
                self.tasks[frame.id] = asyncio.create_task(self.activate(frame), name=f"activate-{frame.id}")
            elif isinstance(frame, PathReply):
                waiter = self.paths.pop(frame.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        # The worker closed the socket (it stops this process, or it died): the actors
        # here write their last state and step down, so the next call finds them elsewhere.
        if self._actors is not None:
            await self._on_actor_loop(self._actors.shutdown("the worker let go of this process"))

    def actor_host(self) -> ActorHost:
        """The actors of this process, on their own loop thread (started at the first)."""
        if self._actors is None:
            self._actor_loop = LoopThread()

            def send(frame: Any) -> None:
                self.loop.call_soon_threadsafe(self.send, frame)

            self._actors = ActorHost(self.app.name, self.app.members, send)
        return self._actors

    async def _on_actor_loop(self, coro: Any) -> Any:
        assert self._actor_loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._actor_loop.loop))

    @staticmethod
    async def _next(reader: asyncio.StreamReader) -> Any:
        try:
            return await read_frame(reader, parent=False)
        except ConnectionError:
            return None  # the worker is gone

    async def activate(self, frame: Activate) -> None:
        started = time.perf_counter()
        try:
            pid = await self._on_actor_loop(self.actor_host().activate(frame))
            self.send(Done(id=frame.id, result=pid, exec_ms=(time.perf_counter() - started) * 1000.0))
        except MnemosError as e:
            self.send(Failed(id=frame.id, code=e.code, message=e.message, retryable=e.retryable))
        except Exception as e:  # noqa: BLE001 - the actor's __init__ (or its state) failed
            self.send(Failed(id=frame.id, code="execution_error", message=f"activating {frame.cls} raised "
                             f"{type(e).__name__}: {e}", exception_type=type(e).__name__,
                             traceback="".join(traceback.format_exception(e))))
        finally:
            self.tasks.pop(frame.id, None)

    # ------------------------------------------------------------------ model files

    def model_path(self, name: str) -> str:
        """``mnemos.model_path`` here: ask the worker (it holds the disk cache). Blocking."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("mnemos.model_path() blocks: call it from a plain (sync) method such as @enter")
        future: Future[PathReply] = asyncio.run_coroutine_threadsafe(self._ask_path(name), self.loop)
        reply = future.result()
        if reply.path is None:
            raise LookupError(reply.error or f"model {name!r} is not available")
        return reply.path

    async def _ask_path(self, name: str) -> PathReply:
        request_id = next(self.path_ids)
        waiter: asyncio.Future[PathReply] = self.loop.create_future()
        self.paths[request_id] = waiter
        self.send(PathRequest(id=request_id, model=name))
        return await waiter

    # ------------------------------------------------------------------ calls

    def cancel(self, call_id: int) -> None:
        stop = self.stops.get(call_id)
        if stop is not None:
            stop.set()
        task = self.tasks.get(call_id)
        if task is not None:
            task.cancel()

    async def in_thread(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run a plain function in a thread. Cancelled, it still waits for the function to
        return (a thread cannot be stopped): the worker decides how long that may take."""
        future = self.loop.run_in_executor(self.threads, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait({future})
            raise

    async def call(self, frame: Call) -> None:
        started = time.perf_counter()
        stop = self.stops[frame.id] = threading.Event()
        try:
            definition, fn, kind, method, load_ms = await self._resolve(frame.target)
            batch: tuple[int, int] | None = None
            if kind == "batched" and method is not None:
                batcher = self.batchers.get(frame.target)
                if batcher is None:
                    batcher = self.batchers[frame.target] = _Batcher(self, method)
                result, size, batch_id = await batcher.submit(fn, frame.args, frame.kwargs)
                batch = (size, batch_id)
            else:
                self._check_arguments(fn, frame)
                async with self.limits[definition.name]:
                    result = await self._invoke(frame.id, fn, frame.args, frame.kwargs, stop)
            _check_json(result, f"the result of {frame.target}")
            self.send(Done(id=frame.id, result=result, exec_ms=(time.perf_counter() - started) * 1000.0,
                           load_ms=load_ms, batch_size=batch[0] if batch else None,
                           batch_id=batch[1] if batch else None))
        except asyncio.CancelledError:
            self.send(Cancelled(id=frame.id))
        except _UserError as e:
            self.send(Failed(id=frame.id, code=e.code, message=e.message, retryable=e.retryable))
        except Exception as e:  # noqa: BLE001 - the user's exception, reported as such
            # Retryable: the call's ``retries`` say whether it is tried again (as Modal's do).
            self.send(Failed(id=frame.id, code="execution_error", message=f"{type(e).__name__}: {e}",
                             exception_type=type(e).__name__, traceback="".join(traceback.format_exception(e)),
                             retryable=True))
        finally:
            self.tasks.pop(frame.id, None)
            self.stops.pop(frame.id, None)

    @staticmethod
    def _check_arguments(fn: Callable[..., Any], frame: Call) -> None:
        try:
            inspect.signature(fn).bind(*frame.args, **frame.kwargs)
        except TypeError as e:
            raise _UserError("validation_error", f"arguments do not match {frame.target}: {e}") from e
        except ValueError:
            pass  # no signature to check against (a builtin)

    async def _resolve(self, target: str) -> tuple[AppDefinition, Callable[..., Any], str, AppMethod | None,
                                                   float | None]:
        """(definition, callable, kind, method, load ms) of ``add`` or ``Generator.generate``."""
        owner, _, attr = target.partition(".")
        member = self.app.members.get(owner)
        if isinstance(member, Function) and not attr and member.raw is not None:
            return member.definition, member.raw, member.definition.function_kind, None, None
        if isinstance(member, Cls) and attr:
            method = next((m for m in member.definition.methods if m.name == attr), None)
            if method is not None:
                instance, load_ms = await self._instance(member)
                return member.definition, getattr(instance, attr), method.kind, method, load_ms
        raise _UserError("unknown_function", f"app {self.app.name} defines no {target!r} (deployed from other source?)")

    async def _instance(self, member: Cls) -> tuple[Any, float | None]:
        """The class's instance, entered (its ``@enter`` methods run) on first use."""
        slot = self.instances.setdefault(member.definition.name, _Instance())
        if slot.value is not None:
            return slot.value, None
        waited = time.perf_counter()
        async with slot.lock:
            if slot.value is None:
                slot.value = await self._enter(member)
        return slot.value, (time.perf_counter() - waited) * 1000.0

    async def _enter(self, member: Cls) -> Any:
        definition, raw = member.definition, member.raw
        assert raw is not None
        _check_stack(definition)
        try:
            instance = await self.in_thread(raw, [], {})
            for attr, value in vars(raw).items():
                role = getattr(value, "__mnemos_role__", None)
                if role is None or role.role != "enter":
                    continue
                bound = getattr(instance, attr)
                if inspect.iscoroutinefunction(bound):
                    await bound()
                else:
                    await self.in_thread(bound, [], {})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise _UserError("model_load_error", f"{definition.name} @enter raised {type(e).__name__}: {e}\n"
                             + "".join(traceback.format_exception(e))) from e
        return instance

    async def _invoke(self, call_id: int, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any],
                      stop: threading.Event) -> Any:
        if inspect.isasyncgenfunction(fn):
            items = []
            async for item in fn(*args, **kwargs):
                _check_json(item, "a streamed item")
                self.send(Item(id=call_id, value=item))
                items.append(item)
            return items
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        if inspect.isgeneratorfunction(fn):
            return await self.in_thread(self._drive, [call_id, fn, args, kwargs, stop], {})
        return await self.in_thread(fn, args, kwargs)

    def _drive(self, call_id: int, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any],
               stop: threading.Event) -> list[Any]:
        """Iterate a sync generator (its thread), sending each item from the loop."""
        items = []
        gen = fn(*args, **kwargs)
        try:
            for item in gen:
                _check_json(item, "a streamed item")
                self.loop.call_soon_threadsafe(self.send, Item(id=call_id, value=item))
                items.append(item)
                if stop.is_set():
                    break
        finally:
            gen.close()
        return items


def _check_stack(definition: AppDefinition) -> None:
    """The worker stack and GPU a class declares are here, or its calls cannot run here."""
    if definition.runtime != "python":
        from neuron_runtime.runtimes import RUNTIME_CLASSES

        if not RUNTIME_CLASSES[definition.runtime].available():
            raise _UserError("model_load_error", f"{definition.name} needs the {definition.runtime} stack, which "
                             "this worker does not have", retryable=True)
    if definition.gpu is not None:
        try:
            import torch

            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - no torch, no CUDA: no GPU
            names = []
        wanted = definition.gpu.lower()
        if not names or (wanted != "any" and not any(wanted in n.lower() for n in names)):
            raise _UserError("model_load_error", f"{definition.name} needs a GPU ({definition.gpu}); this worker "
                             f"has {', '.join(names) or 'none'}", retryable=True)


async def _main(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.fd)
    started = time.perf_counter()
    directory = Path(args.dir)
    os.chdir(directory)
    sys.path.insert(0, str(directory))
    try:
        app = load_app(directory, args.file, args.app)
    except BaseException as e:  # noqa: BLE001 - reported to the worker, then this process ends
        _, writer = await asyncio.open_unix_connection(sock=sock)
        write_frame(writer, Failed(id=0, code="model_load_error", message=f"importing {args.file} raised "
                                   f"{type(e).__name__}: {e}", exception_type=type(e).__name__,
                                   traceback="".join(traceback.format_exception(e))))
        await writer.drain()
        writer.close()
        return 1
    child = Child(sock, app)
    await child.serve((time.perf_counter() - started) * 1000.0)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="neuron_runtime.app_child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--app", required=True)
    code = asyncio.run(_main(parser.parse_args(argv)))
    # The user's threads (a call still running when the worker went away) must not keep it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
