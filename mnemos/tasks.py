"""Stopping background tasks the same way everywhere."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger("mnemos.tasks")


async def cancel_and_wait(task: asyncio.Task[object] | None, timeout: float = 5.0) -> None:
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
