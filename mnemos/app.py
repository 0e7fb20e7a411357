"""Apps: the programming model users deploy with (Modal's names, MNEMOS's guarantees).

    import mnemos

    app = mnemos.App("sentiment")

    @app.function(timeout=60, retries=2, max_concurrency=8)
    def add(a: int, b: int) -> int:
        return a + b

    @app.cls(max_concurrency=8)
    class Generator:
        @mnemos.enter()
        def load(self): ...                       # once per worker process, before the first call
        @mnemos.method()
        def generate(self, prompt: str): yield ...  # a generator streams its items
        @mnemos.batched(max_batch_size=8, wait_ms=10)
        def embed(self, texts: list[str]) -> list[list[float]]: ...

``mnemos deploy app.py`` makes it live; then, from any process that imports it (or looks
it up with :meth:`Function.from_name`)::

    add.remote(2, 3)                       # 5, waiting for it
    call = add.spawn(2, 3); call.get()     # a handle: .get(timeout), .cancel(), .job_id
    list(add.map([1, 3], [2, 4]))          # [3, 7]: ordered, bounded in flight
    list(add.starmap([(1, 2), (3, 4)]))    # [3, 7]
    for word in Generator().generate.remote_gen("hi"): ...
    await add.remote.aio(2, 3)             # every call form has an async twin: .aio

Every call is a normal job (``jobs ls``, HTTP, metrics, retries, timeouts, cancel,
idempotency through :meth:`Function.with_options`) of the registry model
``<app>:<version>``; the version is the live one when the call is made. Arguments and
results travel as JSON. The handles connect with :func:`configure`'s settings, by default
the ``MNEMOS_*`` environment (``MNEMOS_NATS_URL``, ``MNEMOS_NAMESPACE``...).

This module is the contract between user code and the workers that run it: the worker's
app process imports the user's file, finds the :class:`App` and reads
:attr:`App.members`. Nothing here imports a role.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import inspect
import re
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import msgspec

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.errors import MnemosError, UnknownFunction, from_info
from mnemos.messages import (
    AppDefinition,
    AppMethod,
    AppRecord,
    JobRecord,
    JobSpec,
    ResultChunk,
    ResultFinal,
    RetryPolicy,
)
from mnemos.sync import LoopThread

__all__ = [
    "App",
    "Function",
    "Cls",
    "Obj",
    "Method",
    "Actor",
    "ActorRef",
    "ActorMethod",
    "FunctionCall",
    "enter",
    "method",
    "batched",
    "configure",
    "model_path",
    "load_module",
]

T = TypeVar("T")
M = TypeVar("M", "Function", "Cls", "Actor")
_APP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
#: Calls of one ``map`` in flight at once.
DEFAULT_MAP_WINDOW = 32


# ----------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class _Role:
    role: str  # "enter" | "method" | "batched"
    max_batch_size: int = 8
    wait_ms: float = 10.0


def _mark(role: _Role) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__mnemos_role__ = role  # type: ignore[attr-defined]
        return fn

    return decorate


def enter() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method of an app class to run once per worker process, before its first call
    (load weights here). Its duration is the load time of the call that waited for it."""
    return _mark(_Role("enter"))


def method() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method of an app class as callable (a generator method streams its items)."""
    return _mark(_Role("method"))


def batched(*, max_batch_size: int = 8, wait_ms: float = 10.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method that takes lists: calls (from any client) made within ``wait_ms`` of
    the first are run together, up to ``max_batch_size`` at once, each parameter a list
    with one entry per call, and the method returns one result per call, in order."""
    if not 1 <= max_batch_size <= 1024:
        raise ValueError("max_batch_size must be 1..1024")
    if not 0 <= wait_ms <= 60_000:
        raise ValueError("wait_ms must be 0..60000")
    return _mark(_Role("batched", max_batch_size, wait_ms))


def _role(fn: Any) -> _Role | None:
    role = getattr(fn, "__mnemos_role__", None)
    return role if isinstance(role, _Role) else None


def _is_stream(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)


# ----------------------------------------------------------------------------- connections


class _Connections:
    """The clients app handles call through: one per event loop for ``.aio`` calls, and
    one on a private loop thread for blocking calls."""

    def __init__(self) -> None:
        self.settings: NatsSettings | None = None
        self._lock = threading.Lock()
        self._async: dict[asyncio.AbstractEventLoop, Client] = {}
        #: A connect in flight per loop: concurrent first calls share it (one connection).
        self._connecting: dict[asyncio.AbstractEventLoop, asyncio.Task[Client]] = {}
        self._thread: LoopThread | None = None
        self._thread_client: Client | None = None

    def configure(self, settings: NatsSettings | None) -> None:
        with self._lock:
            self.settings = settings
            self._async.clear()  # their loops close them; new calls connect anew
            self._connecting.clear()
            thread, self._thread, self._thread_client = self._thread, None, None
        if thread is not None:
            thread.stop()

    async def client(self) -> Client:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is not None and client._nc is not None and not client._nc.is_closed:
            return client
        pending = self._connecting.get(loop)
        if pending is None:
            for other in [lp for lp in self._async if lp.is_closed()]:
                self._async.pop(other, None)
            pending = self._connecting[loop] = loop.create_task(self._connect(loop))
        # Shielded: a caller cancelled while it waits does not cancel the others' connect.
        return await asyncio.shield(pending)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Client:
        try:
            client = await Client.connect(self.settings or NatsSettings())
            self._async[loop] = client
            return client
        finally:
            self._connecting.pop(loop, None)

    def blocking(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the private loop thread and wait for it."""
        with self._lock:
            if self._thread is None or not self._thread.alive:
                self._thread = LoopThread()
            thread = self._thread
        return thread.call(make())


_connections = _Connections()


def configure(settings: NatsSettings | None = None) -> None:
    """Where app handles send their calls (None: the ``MNEMOS_*`` environment, read at the
    next call). Open connections are dropped."""
    _connections.configure(settings)


# ----------------------------------------------------------------------------- model files


#: Set by the worker's app process: resolves a registered model to its local directory.
_model_path_hook: Callable[[str], str] | None = None


def model_path(name: str) -> str:
    """The local directory of the registered model ``name`` (``family:version`` or an
    alias), from the worker's disk cache (downloaded and sha256-verified once per worker,
    kept while the app process lives). Only inside app code running on a worker."""
    if _model_path_hook is None:
        raise RuntimeError("mnemos.model_path() works in app code running on a worker (mnemos deploy)")
    return _model_path_hook(name)


# ----------------------------------------------------------------------------- the app


class App:
    """A named set of functions and classes deployed together (one registry model per
    version). ``requirements``: pip requirements the workers install for it (once per worker
    and set); ``include``: files next to the app's file to ship with it (glob patterns)."""

    def __init__(self, name: str, *, requirements: Iterable[str] = (), include: Iterable[str] = ()) -> None:
        if not _APP_NAME.match(name):
            raise ValueError(f"app name {name!r} must be 1-40 chars of a-z, 0-9 and '-', starting with a letter "
                             "or digit")
        self.name = name
        self.requirements = list(requirements)
        self.include = list(include)
        #: What the app defines, by name: :class:`Function` and :class:`Cls` handles.
        self.members: dict[str, Function | Cls | Actor] = {}

    def __repr__(self) -> str:
        return f"App({self.name!r}, {sorted(self.members)})"

    @property
    def definitions(self) -> list[AppDefinition]:
        return [m.definition for m in self.members.values()]

    @property
    def targets(self) -> list[str]:
        """Every name a job of this app may call."""
        return [t for d in self.definitions for t in d.targets]

    def _add(self, member: M) -> M:
        name = member.definition.name
        if name in self.members:
            raise ValueError(f"app {self.name} already defines {name!r}")
        self.members[name] = member
        return member

    def function(
        self,
        *,
        timeout: float = 300.0,
        retries: int = 0,
        max_concurrency: int = 1,
        min_workers: int = 0,
        max_workers: int = 4,
        scaledown_window: float = 60.0,
        priority: int = 5,
        gpu: str | None = None,
    ) -> Callable[[Callable[..., Any]], Function]:
        """Declare a function; the decorated name becomes a :class:`Function` handle
        (calling it directly still runs it here)."""

        def decorate(fn: Callable[..., Any]) -> Function:
            definition = _definition(
                fn.__name__, "function", inspect.getdoc(fn) or "", timeout=timeout, retries=retries,
                max_concurrency=max_concurrency, min_workers=min_workers, max_workers=max_workers,
                scaledown_window=scaledown_window, priority=priority, gpu=gpu,
                function_kind="stream" if _is_stream(fn) else "call",
            )
            return self._add(Function(self.name, definition, fn.__name__, raw=fn))

        return decorate

    def cls(
        self,
        *,
        runtime: str = "python",
        gpu: str | None = None,
        timeout: float = 300.0,
        retries: int = 0,
        max_concurrency: int = 1,
        min_workers: int = 0,
        max_workers: int = 4,
        scaledown_window: float = 60.0,
        priority: int = 5,
    ) -> Callable[[type[Any]], Cls]:
        """Declare a class: ``@mnemos.enter`` methods run once per worker process, its
        ``@mnemos.method`` and ``@mnemos.batched`` methods are callable. ``runtime`` names
        the worker stack its code needs (``transformers``: torch and transformers import)."""

        def decorate(user_cls: type[Any]) -> Cls:
            methods: list[AppMethod] = []
            for attr, value in vars(user_cls).items():
                role = _role(value)
                if role is None or role.role == "enter":
                    continue
                if role.role == "batched":
                    if _is_stream(value):
                        raise TypeError(f"{user_cls.__name__}.{attr}: a batched method cannot be a generator")
                    methods.append(AppMethod(name=attr, kind="batched", max_batch_size=role.max_batch_size,
                                             wait_ms=role.wait_ms))
                else:
                    methods.append(AppMethod(name=attr, kind="stream" if _is_stream(value) else "call"))
            if not methods:
                raise TypeError(f"{user_cls.__name__} has no @mnemos.method() or @mnemos.batched() method")
            definition = _definition(
                user_cls.__name__, "class", inspect.getdoc(user_cls) or "", methods=methods, runtime=runtime,
                gpu=gpu, timeout=timeout, retries=retries, max_concurrency=max_concurrency,
                min_workers=min_workers, max_workers=max_workers, scaledown_window=scaledown_window,
                priority=priority,
            )
            return self._add(Cls(self.name, definition, raw=user_cls))

        return decorate

    def actor(
        self,
        *,
        idle_timeout: float = 300.0,
        checkpoint_interval: float | None = None,
        timeout: float = 60.0,
        min_workers: int = 1,
        max_workers: int = 4,
    ) -> Callable[[type[Any]], Actor]:
        """Declare an actor: long-lived, stateful instances addressed by key
        (``Counter.get("user-42")``). Its public methods are callable; calls to one key
        run one at a time, in arrival order, in the one process that hosts it. Its state
        (``vars(self)``, or what ``__getstate__`` returns; JSON) is checkpointed after each
        call, or at most every ``checkpoint_interval`` seconds, and restored (with
        ``__setstate__`` if defined, without calling ``__init__``) wherever it is activated
        next: after ``idle_timeout`` seconds without a call, or after its host died.
        ``min_workers`` (1) keeps a worker up for the app's actors (they are not queued
        jobs, so they do not scale a pool from zero)."""

        def decorate(user_cls: type[Any]) -> Actor:
            methods: list[AppMethod] = []
            for attr, value in vars(user_cls).items():
                if attr.startswith("_") or not callable(value) or isinstance(value, staticmethod | classmethod):
                    continue
                if _is_stream(value):
                    raise TypeError(f"{user_cls.__name__}.{attr}: an actor method cannot be a generator")
                methods.append(AppMethod(name=attr, kind="call"))
            if not methods:
                raise TypeError(f"actor {user_cls.__name__} has no public method")
            definition = _definition(
                user_cls.__name__, "actor", inspect.getdoc(user_cls) or "", methods=methods, timeout=timeout,
                idle_timeout=idle_timeout, checkpoint_interval=checkpoint_interval, min_workers=min_workers,
                max_workers=max_workers,
            )
            return self._add(Actor(self.name, definition, raw=user_cls))

        return decorate


def _definition(name: str, kind: str, doc: str, **settings: Any) -> AppDefinition:
    """An :class:`AppDefinition`, validated as the wire would (a ValueError says what is wrong)."""
    raw = {"name": name, "kind": kind, "description": doc[:1024], **settings}
    try:
        return msgspec.convert(raw, AppDefinition)
    except msgspec.ValidationError as e:
        raise ValueError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------- calling


class _Dual(Generic[T]):
    """A call form with a blocking ``__call__`` and its async twin ``.aio``."""

    def __init__(self, aio: Callable[..., Coroutine[Any, Any, T]]) -> None:
        self.aio = aio

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        return _connections.blocking(lambda: self.aio(*args, **kwargs))


class _DualIter(Generic[T]):
    """A call form that yields: a blocking iterator, and ``.aio`` an async one."""

    def __init__(self, aio: Callable[..., AsyncIterator[T]]) -> None:
        self.aio = aio

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[T]:
        agen = self.aio(*args, **kwargs)
        try:
            while True:
                try:
                    yield _connections.blocking(lambda: _anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                _connections.blocking(aclose)


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


@dataclass(frozen=True)
class _Options:
    """Per-call settings :meth:`_Invocable.with_options` may change."""

    timeout: float | None = None
    retries: int | None = None
    priority: int | None = None
    idempotency_key: str | None = None
    queue_timeout: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _result(record: JobRecord) -> Any:
    """A finished call's result, or its error raised (the :mod:`mnemos.errors` class)."""
    if record.status == "completed" and record.output is not None:
        return record.output.result
    if record.error is not None:
        raise from_info(record.error)
    raise MnemosError(f"job {record.job_id} ended {record.status}")


def _item(chunk: ResultChunk) -> Any:
    """A streamed item as the generator yielded it (text pieces are ``str``)."""
    return chunk.data if chunk.data is not None else chunk.text


class _Invocable:
    """What a function and a method of a class share: the ways to call one target."""

    def __init__(self, app: str, definition: AppDefinition, target: str, kind: str,
                 options: _Options | None = None) -> None:
        self.app = app
        self.definition = definition
        #: What jobs name in ``model.runtime_config.function``: ``add``, ``Generator.embed``.
        self.target = target
        #: ``call``, ``stream`` or ``batched``.
        self.kind = kind
        self.options = options or _Options()
        self.remote: _Dual[Any] = _Dual(self._remote)
        self.spawn: _Dual[FunctionCall] = _Dual(self._spawn)
        self.map: _DualIter[Any] = _DualIter(self._map)
        self.starmap: _DualIter[Any] = _DualIter(self._starmap)
        self.remote_gen: _DualIter[Any] = _DualIter(self._remote_gen)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.app}::{self.target}>"

    def with_options(self, **changes: Any) -> Any:
        """The same target with per-call settings changed: ``timeout``, ``retries``,
        ``priority``, ``idempotency_key``, ``queue_timeout``, ``metadata``."""
        clone = copy.copy(self)
        _Invocable.__init__(clone, self.app, self.definition, self.target, self.kind,
                            replace(self.options, **changes))
        return clone

    async def _version(self, client: Client) -> str:
        record: AppRecord = await client.app(self.app)
        return record.version

    def _spec(self, version: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JobSpec:
        d, o = self.definition, self.options
        spec = job_spec(
            f"{self.app}:{version}", runtime="python", function=self.target, args=list(args), kwargs=kwargs,
            priority=o.priority or d.priority, timeout_seconds=o.timeout or d.timeout,
            idempotency_key=o.idempotency_key, queue_timeout_seconds=o.queue_timeout,
            metadata={"app": self.app, "function": self.target, **o.metadata},
        )
        retries = d.retries if o.retries is None else o.retries
        return msgspec.structs.replace(spec, retry_config=RetryPolicy(max_retries=retries, jitter=False))

    async def _remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run one call and return its result (a generator's: the list of its items)."""
        client = await _connections.client()
        spec = self._spec(await self._version(client), args, kwargs)
        return _result(await client.run(spec))

    async def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        client = await _connections.client()
        record = await client.submit(self._spec(await self._version(client), args, kwargs))
        return FunctionCall(record.job_id)

    async def _remote_gen(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """The items of a generator call as they stream. A retried call streams its new
        attempt's items from the start."""
        client = await _connections.client()
        record = await client.submit(self._spec(await self._version(client), args, kwargs))
        async for message in client.stream(record.job_id):
            if isinstance(message, ResultChunk):
                yield _item(message)
            elif isinstance(message, ResultFinal) and message.status in ("failed", "timeout", "cancelled"):
                _result(await client.get(record.job_id))

    async def _starmap(self, items: Iterable[Iterable[Any]], *, kwargs: dict[str, Any] | None = None,
                       return_exceptions: bool = False, window: int = DEFAULT_MAP_WINDOW) -> AsyncIterator[Any]:
        """One call per tuple of arguments; results in input order, at most ``window`` calls
        in flight. A failed call raises its error there (the calls after it still ran), or
        with ``return_exceptions`` takes its place in the results as the exception."""
        client = await _connections.client()
        version = await self._version(client)
        source = iter(items)
        pending: deque[asyncio.Task[Any]] = deque()

        async def one(args: tuple[Any, ...]) -> Any:
            return _result(await client.run(self._spec(version, args, dict(kwargs or {}))))

        def launch() -> None:
            for args in source:
                pending.append(asyncio.ensure_future(one(tuple(args))))
                return

        for _ in range(max(1, window)):
            launch()
        try:
            while pending:
                task = pending.popleft()
                try:
                    value = await task
                except MnemosError as e:
                    if not return_exceptions:
                        raise
                    value = e
                launch()
                yield value
        finally:
            for task in pending:  # stop waiting; the jobs themselves run to their end
                task.cancel()

    def _map(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None,
             return_exceptions: bool = False, window: int = DEFAULT_MAP_WINDOW) -> AsyncIterator[Any]:
        """Modal's form: one iterable per parameter, zipped (``add.map([1, 3], [2, 4])``)."""
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments")
        # Modal's map stops at the shortest iterable, as zip does.
        return self._starmap(zip(*iterables, strict=False), kwargs=kwargs, return_exceptions=return_exceptions,
                             window=window)


class FunctionCall:
    """A spawned call: ``get(timeout)`` its result, ``cancel()`` it; ``job_id`` is its job."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.get: _Dual[Any] = _Dual(self._get)
        self.cancel: _Dual[JobRecord] = _Dual(self._cancel)

    def __repr__(self) -> str:
        return f"<FunctionCall {self.job_id}>"

    async def _get(self, timeout: float | None = None) -> Any:
        """The result once the call has ended (:class:`~mnemos.errors.JobTimeout` after
        ``timeout`` seconds of waiting; the call goes on)."""
        client = await _connections.client()
        return _result(await client.wait(self.job_id, timeout=timeout))

    async def _cancel(self, reason: str | None = None) -> JobRecord:
        client = await _connections.client()
        return await client.cancel(self.job_id, reason)


class Function(_Invocable):
    """A deployed function (``@app.function``). Calling it directly runs it in this process."""

    def __init__(self, app: str, definition: AppDefinition, target: str, *, raw: Callable[..., Any] | None = None,
                 options: _Options | None = None) -> None:
        super().__init__(app, definition, target, definition.function_kind, options)
        #: The user's function (None for a handle looked up by name).
        self.raw = raw

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self.raw is None:
            raise TypeError(f"{self!r} was looked up by name: it has no local code")
        return self.raw(*args, **kwargs)

    __call__ = local

    @classmethod
    def from_name(cls, app: str, name: str) -> "Function":
        """The function ``name`` of the deployed app ``app`` (its live settings)."""
        return cls(app, _deployed(app, name, "function"), name)


class Method(_Invocable):
    """A method of a deployed class: the call forms of :class:`Function`."""


class Obj:
    """An instance handle of a deployed class: its methods are :class:`Method` handles
    (the instance itself lives in each worker's app process, entered once there)."""

    def __init__(self, owner: "Cls") -> None:
        self._owner = owner
        for m in owner.definition.methods:
            setattr(self, m.name, Method(owner.app, owner.definition, f"{owner.definition.name}.{m.name}",
                                         "stream" if m.kind == "stream" else m.kind))

    def __repr__(self) -> str:
        return f"<{self._owner.definition.name} of app {self._owner.app}>"


class _Deployed:
    """A class an app defines (``KIND``), as a handle."""

    KIND = ""

    def __init__(self, app: str, definition: AppDefinition, *, raw: type[Any] | None = None) -> None:
        self.app = app
        self.definition = definition
        #: The user's class (None for a handle looked up by name).
        self.raw = raw

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.app}::{self.definition.name}>"

    @classmethod
    def from_name(cls, app: str, name: str) -> Any:
        """The definition ``name`` of the deployed app ``app``."""
        return cls(app, _deployed(app, name, cls.KIND))


class Cls(_Deployed):
    """A deployed class (``@app.cls``): ``Cls()`` is an :class:`Obj` whose methods call it."""

    KIND = "class"

    def __call__(self) -> Obj:
        return Obj(self)


class Actor(_Deployed):
    """A deployed actor class (``@app.actor``): ``Actor.get(key)`` is the instance with
    that key, the same one from every client."""

    KIND = "actor"

    def get(self, key: str) -> ActorRef:
        if not isinstance(key, str) or not 1 <= len(key) <= 256:
            raise ValueError("an actor key is a string of 1-256 characters")
        return ActorRef(self, key)


class ActorRef:
    """One actor (class and key): its methods are :class:`ActorMethod` handles."""

    def __init__(self, owner: Actor, key: str) -> None:
        self.owner = owner
        self.key = key
        for m in owner.definition.methods:
            setattr(self, m.name, ActorMethod(self, m.name))

    def __repr__(self) -> str:
        return f"<{self.owner.definition.name}({self.key!r}) of app {self.owner.app}>"


class ActorMethod:
    """``.remote(*args)`` (blocking) and ``.remote.aio(*args)``: call the actor's method."""

    def __init__(self, ref: ActorRef, name: str) -> None:
        self.ref = ref
        self.name = name
        self.remote: _Dual[Any] = _Dual(self._remote)

    async def _remote(self, *args: Any, **kwargs: Any) -> Any:
        client = await _connections.client()
        owner = self.ref.owner
        return await client.call_actor(owner.app, owner.definition.name, self.ref.key, self.name, list(args),
                                       kwargs, timeout=owner.definition.timeout)


async def _lookup(app: str) -> AppRecord:
    client = await _connections.client()
    return await client.app(app)


def _deployed(app: str, name: str, kind: str) -> AppDefinition:
    """The live definition ``name`` of ``app``; ``unknown_function`` if it is not a ``kind``."""
    record = _connections.blocking(lambda: _lookup(app))
    d = record.definition(name)
    if d is None or d.kind != kind:
        raise UnknownFunction(f"app {app} has no {kind} {name!r}; it defines "
                              f"{', '.join(f'{x.kind} {x.name}' for x in record.definitions)}")
    return d


def load_module(path: Path, module_name: str) -> ModuleType:
    """Import the file ``path`` as ``module_name`` (registered in ``sys.modules`` first, as
    import does: dataclasses and pickle look modules up there)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
