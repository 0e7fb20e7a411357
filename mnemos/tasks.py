"""Background tasks: started through one supervisor, stopped the same way everywhere.

A component spawns each of its loops with :meth:`Supervisor.spawn`. A loop that ends with
an exception (or ends at all, when it was meant to run until stopped) is logged with its
name and recorded as the component's fatal error; :meth:`Supervisor.failed` is set, and
the process's ``main`` exits non-zero so that ``mnemos up`` or the container runtime
restarts it. One-shot work that may fail without harming the component (a doorbell
publish, a best-effort cancel) goes through :meth:`Supervisor.spawn_oneshot`: its failure
is logged with its name, and :meth:`Supervisor.stop` ends it too. Nothing a background
task raises can vanish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["cancel_and_wait", "Supervisor", "BackgroundTaskDied", "until_stopped_or_failed", "next_round"]

log = logging.getLogger("mnemos.tasks")


async def next_round(seconds: float) -> None:
    """The pause between two rounds of a periodic loop: ``asyncio.sleep``, but first it
    ends the loop if the task was cancelled and the cancellation got lost.

    Python 3.11's ``asyncio.wait_for`` (under nats-py's requests and JetStream publishes)
    drops a cancellation that arrives just as its inner future completes (CPython
    gh-86296, fixed in 3.12); the task's ``cancelling()`` count still says it was asked to
    stop. Without this check a loop that lost its cancellation goes on: a stopped worker's
    heartbeat kept writing its record after it had deregistered.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


class BackgroundTaskDied(RuntimeError):
    """A supervised loop ended although nothing stopped it."""


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float = 5.0) -> None:
    """Cancel ``task`` and wait (at most ``timeout``) for it to end; log one that does not.

    An exception it ended with (other than its cancellation) is logged, not lost.
    """
    if task is None or task.done() and task.cancelled():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.error("task %s did not stop within %.0f s", task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.error("task %s had failed: %r", task.get_name(), task.exception())


class Supervisor:
    """Keeps a handle on every background task of one component and notices its death.

    ``on_failure(task_name, error)``, if given, is called once, at the first death (a
    worker uses it to publish its ``error`` state before it exits).
    """

    def __init__(self, component: str, on_failure: Callable[[str, BaseException], None] | None = None) -> None:
        self.component = component
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        #: Set when a supervised task died; :attr:`error` says which and why.
        self.failed = asyncio.Event()
        self.error: BaseException | None = None
        #: The name of the task that died first (``<component>-<name>``).
        self.failed_task: str | None = None
        self._on_failure = on_failure
        self._oneshots: set[asyncio.Task[Any]] = set()
        self._stopped_tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called for every task (the component is shutting down)."""
        return self._stopping

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any], *, forever: bool = True) -> asyncio.Task[Any]:
        """Run ``coro`` as task ``name``. ``forever``: it runs until stopped, so returning
        is a death too; otherwise only an exception is."""
        task = asyncio.create_task(coro, name=f"{self.component}-{name}")
        self.tasks[name] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self.tasks.get(name) is t:
                del self.tasks[name]
            asked_to_stop = t in self._stopped_tasks
            self._stopped_tasks.discard(t)
            if t.cancelled() or self._stopping or asked_to_stop:
                return  # what it raised while stopping is logged by cancel_and_wait
            exc = t.exception()
            if exc is None and not forever:
                return
            err = exc if exc is not None else BackgroundTaskDied(f"{t.get_name()} returned")
            log.error("background task %s died: %r", t.get_name(), err, exc_info=exc)
            if self.error is None:
                self.error, self.failed_task = err, t.get_name()
                if self._on_failure is not None:
                    self._on_failure(t.get_name(), err)
            self.failed.set()

        task.add_done_callback(done)
        return task

    def spawn_oneshot(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Run ``coro`` once as task ``name`` (names may repeat). A failure is logged with the
        name and is not fatal. Once the component is stopping, ``coro`` is not run (None)."""
        if self._stopping:
            coro.close()
            log.debug("%s-%s not started: %s is stopping", self.component, name, self.component)
            return None
        task = asyncio.create_task(coro, name=f"{self.component}-{name}")
        self._oneshots.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._oneshots.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.warning("task %s failed: %r", t.get_name(), exc, exc_info=exc)

        task.add_done_callback(done)
        return task

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the one-shot tasks under way to finish."""
        if self._oneshots:
            await asyncio.wait(set(self._oneshots), timeout=timeout)

    async def stop(self, name: str | None = None, timeout: float = 5.0) -> None:
        """Cancel one task (``name``) or all of them (one-shots too), waiting for each to end."""
        if name is None:
            self._stopping = True
            for n in list(self.tasks):
                await cancel_and_wait(self.tasks.get(n), timeout)
            for oneshot in list(self._oneshots):
                await cancel_and_wait(oneshot, timeout)
            return
        task = self.tasks.pop(name, None)
        if task is not None:
            self._stopped_tasks.add(task)
        await cancel_and_wait(task, timeout)

    def raise_if_failed(self) -> None:
        """Re-raise the first death (at the end of a component's shutdown)."""
        if self.error is not None:
            raise self.error


async def until_stopped_or_failed(stop: asyncio.Event, supervisor: Supervisor) -> None:
    """Return when ``stop`` is set (a signal) or a task of ``supervisor`` died: a role's
    ``main`` then stops its component in order, and the component's ``stop`` re-raises the
    death so that the process exits non-zero."""
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(supervisor.failed.wait())
    try:
        await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        failing.cancel()
