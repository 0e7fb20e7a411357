"""A blocking MNEMOS client for scripts and notebooks.

    with SyncClient.connect() as client:
        done = client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]))
        for item in client.stream(client.submit(job_spec("demo-gpt2:v1", prompt="hi")).job_id): ...

:class:`SyncClient` wraps the async :class:`~mnemos.client.Client`: it runs ONE private event
loop in a daemon thread and hands every call to it (``asyncio.run_coroutine_threadsafe``),
so it works where ``asyncio.run`` cannot: inside Jupyter, or inside a program that already
runs an event loop. Errors are the :mod:`mnemos.errors` classes the async client raises,
unchanged. A closed client raises :class:`~mnemos.errors.NotConnected`.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from mnemos.client import Client
from mnemos.config import NatsSettings
from mnemos.errors import NotConnected
from mnemos.messages import (
    AppDeployed,
    AppRecord,
    DeployApp,
    JobList,
    JobRecord,
    JobSpec,
    ModelRecord,
    PoolSpec,
    PoolView,
    ResultMessage,
    WorkerRecord,
)

__all__ = ["SyncClient", "LoopThread"]

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="mnemos-sync-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Whatever is still pending (an abandoned stream, a call interrupted by Ctrl-C)
            # is cancelled and awaited, so nothing runs on a closed loop.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it is done; its exception is raised here."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a SyncClient method was called from its own event loop; use mnemos.Client there")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C) or failed: do not leave the call running behind our back.
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and wait for its thread. Safe to call twice."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


class SyncClient:
    """Blocking client of one MNEMOS namespace: the methods of :class:`~mnemos.client.Client`
    without ``await``. Create it with :meth:`connect`; close it (or use ``with``) to stop its
    loop thread."""

    def __init__(self, client: Client, loop: LoopThread, *, owned: bool = True) -> None:
        self._client: Client | None = client
        self._loop = loop
        self._owned = owned

    @classmethod
    def connect(
        cls, settings: NatsSettings | None = None, *, request_timeout: float = 10.0, tenant: str | None = None
    ) -> "SyncClient":
        """Connect to NATS as described by ``settings`` (default: ``MNEMOS_*`` environment)."""
        loop = LoopThread()
        try:
            client = loop.call(Client.connect(settings, request_timeout=request_timeout, tenant=tenant))
        except BaseException:
            loop.stop()
            raise
        return cls(client, loop)

    def for_tenant(self, tenant: str | None) -> "SyncClient":
        """A client on the same connection and loop acting for ``tenant`` (closing it closes nothing)."""
        return SyncClient(self._live().for_tenant(tenant), self._loop, owned=False)

    @property
    def tenant(self) -> str | None:
        return self._live().tenant

    def close(self) -> None:
        """Close the connection (if this client owns it) and stop the loop thread. Safe to call twice."""
        client, self._client = self._client, None
        if client is None or not self._owned:
            return
        try:
            if self._loop.alive:
                self._loop.call(client.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Client:
        if self._client is None or not self._loop.alive:
            raise NotConnected("the MNEMOS client is closed")
        return self._client

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._loop.alive:
            coro.close()
            raise NotConnected("the MNEMOS client is closed")
        return self._loop.call(coro)

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: JobSpec) -> JobRecord:
        """Queue a job; returns its record (status ``queued``)."""
        return self._call(self._live().submit(spec))

    def run(self, spec: JobSpec, timeout: float | None = None) -> JobRecord:
        """Submit and wait for the finished record; :class:`~mnemos.errors.JobTimeout` after ``timeout``."""
        return self._call(self._live().run(spec, timeout))

    def get(self, job_id: str) -> JobRecord:
        return self._call(self._live().get(job_id))

    def list(
        self,
        *,
        status: builtins.list[str] | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        dead_letter: bool = False,
    ) -> JobList:
        return self._call(self._live().list(status=status, model=model, limit=limit, cursor=cursor,
                                            dead_letter=dead_letter))

    def cancel(self, job_id: str, reason: str | None = None) -> JobRecord:
        return self._call(self._live().cancel(job_id, reason))

    def retry(self, job_id: str) -> JobRecord:
        return self._call(self._live().retry(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """The job's record once it is terminal; :class:`~mnemos.errors.JobTimeout` after ``timeout``."""
        return self._call(self._live().wait(job_id, timeout))

    def stream(self, job_id: str, *, start_seq: int | None = None) -> Iterator[ResultMessage]:
        """The job's result messages as :meth:`Client.stream <mnemos.client.Client.stream>`
        yields them (resuming after a reconnect), one blocking ``next()`` at a time."""
        agen = self._live().stream(job_id, start_seq=start_seq)
        try:
            while True:
                try:
                    item = self._call(_anext(agen))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # Left early (break, an exception): close the subscription on the loop.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and self._loop.alive:
                self._loop.call(aclose())

    # ------------------------------------------------------------------ workers, models

    def workers(self, runtime: str | None = None) -> builtins.list[WorkerRecord]:
        return self._call(self._live().workers(runtime))

    def models(self, runtime: str | None = None) -> builtins.list[ModelRecord]:
        return self._call(self._live().models(runtime))

    def model(self, name: str) -> ModelRecord:
        return self._call(self._live().model(name))

    # ------------------------------------------------------------------ pools

    def pools(self) -> builtins.list[PoolView]:
        return self._call(self._live().pools())

    def pool(self, name: str) -> PoolView:
        return self._call(self._live().pool(name))

    def set_pool(self, spec: PoolSpec) -> PoolView:
        return self._call(self._live().set_pool(spec))

    def delete_pool(self, name: str) -> PoolView:
        return self._call(self._live().delete_pool(name))

    # ------------------------------------------------------------------ apps

    def apps(self) -> builtins.list[AppRecord]:
        return self._call(self._live().apps())

    def app(self, name: str) -> AppRecord:
        return self._call(self._live().app(name))

    def deploy_app(self, body: DeployApp) -> AppDeployed:
        return self._call(self._live().deploy_app(body))


async def _anext(agen: AsyncIterator[T]) -> T:
    """``agen.__anext__()`` as a coroutine (``run_coroutine_threadsafe`` takes only coroutines)."""
    return await agen.__anext__()
