"""The ``python`` runtime: user functions, called with the job's ``args`` and ``kwargs``.

The entrypoint is ``file.py:function`` (a file inside the model directory, imported under
a unique module name so two versions never collide) or ``package.module:function``
(imported normally). How a function runs follows what it is:

- ``async def`` - awaited on the event loop, raced against ``ctx.cancelled``;
- async generator - each item is streamed (``str`` as text, anything else as data) and
  the result is the list of items;
- sync generator - iterated in a thread, each item streamed the same way;
- plain function - in a thread when ``PythonConfig.threaded`` (the default), else inline.

The result must be JSON-encodable (msgspec), since it travels in a NATS message. An
exception raised by the function becomes :class:`~mnemos.errors.ExecutionError` with
the traceback in ``details``; a cancelled job raises :class:`~mnemos.errors.JobCancelled`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from mnemos.errors import ExecutionError, JobCancelled, MnemosError, ModelLoadError, ValidationFailed
from mnemos.messages import JobOutput, ModelRecord
from mnemos.runtime_config import PythonConfig
from neuron_runtime.app_host import AppCall, AppHost, AppServices
from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime

__all__ = ["PythonRuntime", "PythonFunction"]

logger = logging.getLogger("mnemos.runtime.python")

_json = msgspec.json.Encoder()


def _check_json(value: Any, what: str) -> None:
    """Raise :class:`ExecutionError` unless ``value`` encodes as JSON with msgspec."""
    try:
        _json.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError) as e:
        raise ExecutionError(f"{what} is not JSON-encodable ({type(value).__name__}): {e}") from e


def _user_error(e: BaseException) -> ExecutionError:
    """The envelope for an exception raised by user code (type, message and traceback)."""
    return ExecutionError(
        f"{type(e).__name__}: {e}",
        details={"traceback": "".join(traceback.format_exception(e)), "exception_type": type(e).__name__},
    )


async def _cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has finished its cleanup.

    Re-raises ``CancelledError`` only when the caller itself is being cancelled; an error
    the task raises while unwinding is logged (its job is already cancelled).
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        logger.warning("user code raised while being cancelled", exc_info=True)


class _Relay:
    """Carries items from a generator thread to the event loop and streams them there.

    ``ctx.emit`` must run on the loop thread; an error it raises (or a non-JSON item) is
    kept here and stops the generator thread, then re-raised by ``run``.
    """

    def __init__(self, ctx: ExecutionContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.error: BaseException | None = None
        self.items: list[Any] = []

    def emit_item(self, item: Any) -> None:
        """Stream one item (loop thread)."""
        if self.error is not None:
            return
        try:
            if isinstance(item, str):
                self.ctx.emit(item)
            else:
                _check_json(item, "a streamed item")
                self.ctx.emit("", item)
        except Exception as e:  # noqa: BLE001 - kept and re-raised by run()
            self.error = e
            self.ctx.cancel_flag.set()
            return
        self.items.append(item)

    def from_thread(self, item: Any) -> None:
        """Schedule :meth:`emit_item` on the loop (generator thread)."""
        self.loop.call_soon_threadsafe(self.emit_item, item)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


class PythonFunction(LoadedModel):
    """A user function ready to call; many calls may run at once."""

    max_concurrency = 1000
    stop_by_cancelling_task = True

    def __init__(
        self, record: ModelRecord, fn: Callable[..., Any], config: PythonConfig, module_name: str | None
    ) -> None:
        self.record = record
        self.fn = fn
        self.config = config
        self.module_name = module_name
        self.memory_bytes = 0
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Call the function with ``input.args``/``input.kwargs`` and return its JSON result."""
        args = list(ctx.spec.input.args)
        kwargs = dict(ctx.spec.input.kwargs)
        if self.signature is not None:
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise ValidationFailed(f"arguments do not match {self.config.target}{self.signature}: {e}") from e
        if ctx.cancel_flag.is_set():
            raise JobCancelled(f"job {ctx.job_id} was cancelled before it started")

        started = time.perf_counter()
        fn = self.fn
        try:
            if inspect.isasyncgenfunction(fn):
                result: Any = await self._stream_async(ctx, fn(*args, **kwargs))
            elif inspect.iscoroutinefunction(fn):
                # Awaited in the executor's run task: a cancel or timeout cancels that task
                # (``stop_by_cancelling_task``), so no racing task is needed on this path.
                result = await fn(*args, **kwargs)
            elif inspect.isgeneratorfunction(fn):
                result = await self._stream_sync(ctx, lambda: fn(*args, **kwargs))
            else:
                result = await self._call_sync(ctx, fn, args, kwargs)
        except (MnemosError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _user_error(e) from e
        _check_json(result, f"the result of {self.config.target}")
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return JobOutput(
            result=result,
            metadata={"function": self.config.target, "model": self.record.name},
            metrics={"execution_ms": elapsed_ms},
        )

    async def _call_sync(
        self, ctx: ExecutionContext, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        """Call a plain callable, then follow what it returned (awaitable, generator...)."""
        if self.config.threaded:
            value = await self._await(ctx, asyncio.to_thread(fn, *args, **kwargs))
        else:
            value = fn(*args, **kwargs)
        # A callable object or functools.partial may hide an async function or a generator.
        if inspect.isawaitable(value):
            return await self._await(ctx, value)
        if inspect.isasyncgen(value):
            return await self._stream_async(ctx, value)
        if inspect.isgenerator(value):
            gen = value
            return await self._stream_sync(ctx, lambda: gen)
        return value

    async def _await(self, ctx: ExecutionContext, awaitable: Awaitable[Any]) -> Any:
        """Await user code, racing ``ctx.cancelled``; cancel the user's task on either cancel."""
        task = asyncio.ensure_future(awaitable)
        waiter = asyncio.ensure_future(ctx.cancelled.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel_and_wait(task)
            raise
        finally:
            waiter.cancel()
        if not task.done():
            await _cancel_and_wait(task)
            raise JobCancelled(f"job {ctx.job_id} was cancelled")
        return task.result()

    async def _stream_async(self, ctx: ExecutionContext, agen: AsyncIterator[Any]) -> list[Any]:
        """Stream an async generator's items; stop it when the job is cancelled."""
        relay = _Relay(ctx, asyncio.get_running_loop())
        iterator = agen.__aiter__()
        try:
            while True:
                try:
                    item = await self._await(ctx, iterator.__anext__())
                except StopAsyncIteration:
                    break
                relay.emit_item(item)
                relay.raise_if_failed()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        return relay.items

    async def _stream_sync(self, ctx: ExecutionContext, make: Callable[[], Iterator[Any]]) -> list[Any]:
        """Iterate a sync generator in a thread, streaming each item through the loop."""
        relay = _Relay(ctx, asyncio.get_running_loop())
        stop = threading.Event()

        def drive() -> None:
            gen = make()
            try:
                for item in gen:
                    relay.from_thread(item)
                    if stop.is_set() or ctx.cancel_flag.is_set():
                        break
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()

        thread_done = asyncio.ensure_future(asyncio.to_thread(drive))
        waiter = asyncio.ensure_future(ctx.cancelled.wait())
        try:
            await asyncio.wait({thread_done, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            waiter.cancel()
        if not thread_done.done():
            stop.set()
            await asyncio.wait({thread_done})
        # Items the thread scheduled before it finished are delivered by now (FIFO).
        relay.raise_if_failed()
        thread_done.result()
        if ctx.cancel_flag.is_set():
            raise JobCancelled(f"job {ctx.job_id} was cancelled")
        return relay.items

    async def unload(self) -> None:
        """Forget the user module so a new version can load under a fresh name."""
        if self.module_name is not None:
            sys.modules.pop(self.module_name, None)
        logger.info("unloaded %s", self.record.name)


class PythonRuntime(Runtime):
    """Loads a user function named by ``PythonConfig.entrypoint`` (``isolation="thread"``),
    or a handle on the app process of an app version (``isolation="process"``, see
    :mod:`neuron_runtime.app_host`): one process per version, shared by its functions."""

    name: ClassVar[str] = "python"

    def __init__(self) -> None:
        self._services: AppServices | None = None
        self._hosts: dict[tuple[str, str], AppHost] = {}
        self._hosts_lock = asyncio.Lock()
        self._starting: dict[tuple[str, str], asyncio.Lock] = {}
        self._closed = False

    def attach(self, services: Any) -> None:
        self._services = services

    async def load(self, model: ModelRecord, model_dir: Path, config: Any) -> LoadedModel:
        """Import the entrypoint's module in a thread (user imports may be slow) and find the
        function; for an app, start (or share) its process."""
        if not isinstance(config, PythonConfig):
            raise ModelLoadError(f"expected PythonConfig, got {type(config).__name__}", retryable=False)
        if config.isolation == "process":
            return await self._load_app(model, Path(model_dir), config)
        target, _, fn_name = config.target.rpartition(":")
        module, module_name = await asyncio.to_thread(self._import, model, Path(model_dir), target)
        fn = getattr(module, fn_name, None)
        if fn is None or not callable(fn):
            if module_name is not None:
                sys.modules.pop(module_name, None)
            raise ModelLoadError(f"{config.target}: {target} has no callable {fn_name!r}", retryable=False)
        logger.info("loaded %s -> %s", model.name, config.target)
        return PythonFunction(model, fn, config, module_name)

    async def _load_app(self, model: ModelRecord, model_dir: Path | None, config: PythonConfig) -> AppCall:
        host = await self.host_for(model, config, model_dir)
        return AppCall(model, config, host, self.release)

    async def host_for(self, model: ModelRecord, config: PythonConfig, model_dir: Path | None = None) -> AppHost:
        """The host of ``model``'s app process (started if needed), with one more handle on
        it: give it back with :meth:`release` (actors are counted by the host itself). One
        app's start (a download, a pip install) holds up no other app's."""
        key = (model.family, model.version)
        async with self._hosts_lock:
            if self._closed:
                raise ModelLoadError("this worker is stopping", retryable=True)
            lock = self._starting.setdefault(key, asyncio.Lock())
        async with lock:
            async with self._hosts_lock:
                host = self._hosts.get(key)
                if host is not None:
                    host.refs += 1
                    return host
            host = AppHost(model, msgspec.structs.replace(config, function=None), self._services)
            host.on_release = self._maybe_close
            try:
                await host.prepare(model_dir)
                await host.ensure_started()
            except BaseException:
                await host.close()
                raise
            async with self._hosts_lock:
                if self._closed:  # stopped while it started
                    closing = True
                else:
                    closing = False
                    self._hosts[key] = host
                    host.refs += 1
            if closing:
                await host.close()
                raise ModelLoadError("this worker is stopping", retryable=True)
            return host

    async def release(self, host: AppHost) -> None:
        """One handle fewer."""
        async with self._hosts_lock:
            host.refs -= 1
        await self._maybe_close(host)

    async def _maybe_close(self, host: AppHost) -> None:
        """Stop the app process once no handle and no actor uses it."""
        async with self._hosts_lock:
            if host.refs > 0 or host.actors or self._hosts.get((host.record.family, host.record.version)) is not host:
                return
            self._hosts.pop((host.record.family, host.record.version), None)
        await host.close()
        logger.info("stopped the app process of %s", host.record.name)

    def hosts_actor(self, token: str) -> bool:
        """Whether an app process of this worker hosts the actor ``token``."""
        return any(token in host.actors for host in self._hosts.values())

    async def close(self) -> None:
        async with self._hosts_lock:
            self._closed = True
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            await host.close()

    def _import(self, model: ModelRecord, model_dir: Path, target: str) -> tuple[types.ModuleType, str | None]:
        if target.endswith(".py") or "/" in target:
            return self._import_file(model, model_dir, target)
        try:
            return importlib.import_module(target), None
        except ImportError as e:
            raise ModelLoadError(f"cannot import {target!r}: {e}", retryable=False) from e
        except Exception as e:
            raise ModelLoadError(f"importing {target!r} raised {type(e).__name__}: {e}", retryable=False) from e

    def _import_file(self, model: ModelRecord, model_dir: Path, target: str) -> tuple[types.ModuleType, str]:
        root = model_dir.resolve()
        path = (root / target).resolve()
        if not path.is_relative_to(root):
            raise ModelLoadError(f"entrypoint file {target!r} is outside the model directory", retryable=False)
        if not path.is_file():
            raise ModelLoadError(f"entrypoint file {target!r} not found in {model_dir}", retryable=False)
        safe = re.sub(r"[^A-Za-z0-9_]", "_", f"{model.family}_{model.version}_{path.stem}")
        module_name = f"mnemos_fn_{safe}_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"cannot load {path} as a Python module", retryable=False)
        module = importlib.util.module_from_spec(spec)
        # Registered before executing, as import does: dataclasses and pickle look it up.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ModelLoadError(
                f"executing {target} raised {type(e).__name__}: {e}",
                retryable=False,
                details={"traceback": "".join(traceback.format_exception(e))},
            ) from e
        return module, module_name
