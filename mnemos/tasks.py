"""Background tasks: started through one supervisor, stopped the same way everywhere.

A component spawns each of its loops with :meth:`Supervisor.spawn`. A loop that ends with
an exception (or ends at all, when it was meant to run until stopped) is logged with its
name and recorded as the component's fatal error; :meth:`Supervisor.failed` is set, and
the process's ``main`` exits non-zero so that ``mnemos up`` or the container runtime
restarts it. Nothing a background task raises can vanish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["cancel_and_wait", "Supervisor", "BackgroundTaskDied"]

log = logging.getLogger("mnemos.tasks")


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
    """Keeps a handle on every background task of one component and notices its death."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        #: Set when a supervised task died; :attr:`error` says which and why.
        self.failed = asyncio.Event()
        self.error: BaseException | None = None
        self._stopping = False

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any], *, forever: bool = True) -> asyncio.Task[Any]:
        """Run ``coro`` as task ``name``. ``forever``: it runs until stopped, so returning
        is a death too; otherwise only an exception is."""
        task = asyncio.create_task(coro, name=f"{self.component}-{name}")
        self.tasks[name] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self.tasks.get(name) is t:
                del self.tasks[name]
            if t.cancelled() or self._stopping:
                return
            exc = t.exception()
            if exc is None and not forever:
                return
            err = exc if exc is not None else BackgroundTaskDied(f"{t.get_name()} returned")
            log.error("background task %s died: %r", t.get_name(), err, exc_info=exc)
            if self.error is None:
                self.error = err
            self.failed.set()

        task.add_done_callback(done)
        return task

    async def stop(self, name: str | None = None, timeout: float = 5.0) -> None:
        """Cancel one task (``name``) or all of them, waiting for each to end."""
        if name is None:
            self._stopping = True
            for n in list(self.tasks):
                await cancel_and_wait(self.tasks.get(n), timeout)
            return
        task = self.tasks.pop(name, None)
        await cancel_and_wait(task, timeout)

    def raise_if_failed(self) -> None:
        """Re-raise the first death (at the end of a component's shutdown)."""
        if self.error is not None:
            raise self.error
