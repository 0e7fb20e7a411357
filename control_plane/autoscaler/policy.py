"""How many workers a pool should have: the one rule, as a pure function.

``desired = clamp(ceil(demand / per_worker) + buffer, min_workers, max_workers)`` where
``demand`` is the pool's work (dispatch messages held for it: queued or running; at least
the jobs its workers report running), ``per_worker`` the jobs a worker takes at once (the
pool's ``target_concurrency``, never more than the workers declare), and ``buffer`` the
pool's ``buffer_workers``, kept only while there is work (so a pool scales to zero).

Up: at once, to ``desired``. Down: only after ``scaledown_window_s`` of surplus, and then
to the most workers the window needed (a dip shorter than the window costs nothing; a
load that comes back within it finds its workers warm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from mnemos.messages import PoolSpec

__all__ = ["Plan", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    desired: int
    #: Workers to start (> 0) or to drain (< 0) now.
    change: int
    #: More workers are needed than ``max_workers`` allows.
    at_max: bool
    #: The scale-down window: since when there is surplus, and the most it needed since.
    surplus_since: datetime | None
    surplus_peak: int
    reason: str


def plan(
    pool: PoolSpec,
    *,
    demand: int,
    per_worker: int,
    current: int,
    now: datetime,
    surplus_since: datetime | None,
    surplus_peak: int,
) -> Plan:
    """What to do about ``pool`` with ``current`` workers (starting or ready, not draining)."""
    per_worker = max(1, per_worker)
    need = math.ceil(demand / per_worker) + (pool.buffer_workers if demand > 0 else 0)
    desired = min(max(need, pool.min_workers), pool.max_workers)
    at_max = need > pool.max_workers
    saw = (f"demand {demand} job(s) at {per_worker}/worker -> {need} worker(s)"
           f"{f' (incl. {pool.buffer_workers} buffer)' if demand > 0 and pool.buffer_workers else ''}; "
           f"bounds [{pool.min_workers}, {pool.max_workers}] -> desired {desired}; have {current}")
    if desired > current:
        return Plan(desired, desired - current, at_max, None, 0, f"{saw}: scale up now")
    if desired == current:
        return Plan(desired, 0, at_max, None, 0, saw)
    # Surplus: wait for the window, remembering the most it needed.
    if surplus_since is None:
        surplus_since, surplus_peak = now, desired
    else:
        surplus_peak = max(surplus_peak, desired)
    waited = (now - surplus_since).total_seconds()
    if waited < pool.scaledown_window_s:
        return Plan(desired, 0, at_max, surplus_since, surplus_peak,
                    f"{saw}: surplus for {waited:.1f}s of the {pool.scaledown_window_s:g}s window")
    target = min(max(surplus_peak, pool.min_workers), pool.max_workers)
    if target >= current:
        return Plan(desired, 0, at_max, None, 0, f"{saw}: the window needed {surplus_peak}; keep {current}")
    return Plan(target, target - current, at_max, surplus_since, surplus_peak,
                f"{saw}: surplus for {waited:.1f}s >= the {pool.scaledown_window_s:g}s window, "
                f"which needed at most {surplus_peak}: scale down to {target}")
