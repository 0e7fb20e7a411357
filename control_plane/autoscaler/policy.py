"""How many workers a pool should have: the one rule, as a pure function.

``need = clamp(ceil(demand / per_worker) + buffer, min_workers, max_workers)`` where
``demand`` is the pool's work (dispatch messages held for it: queued or running; at least
the jobs its workers report running), ``per_worker`` the jobs a worker takes at once (the
pool's ``target_concurrency``, never more than the workers declare), and ``buffer`` the
pool's ``buffer_workers``, kept only while there is work (so a pool scales to zero).

Up: at once, to ``need``. Down: to the most the last ``scaledown_window_s`` needed, and
only once the autoscaler has watched a whole window (a dip shorter than the window costs
nothing; a load that comes back within it finds its workers warm; a pool idle for a window
goes to ``min_workers``). What the window needed is kept as its change points
(:class:`~mnemos.messages.DesiredPoint`), which go into the pool's status so that a new
leader goes on with the same window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from mnemos.messages import DesiredPoint, PoolSpec

__all__ = ["Plan", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    #: What the pool should have now (``need``, or the window's most when scaling down).
    desired: int
    #: What the work needs this instant.
    need: int
    #: Workers to start (> 0) or to drain (< 0) now.
    change: int
    #: More workers are needed than ``max_workers`` allows.
    at_max: bool
    #: The window's change points after this round (oldest first).
    history: list[DesiredPoint]
    reason: str


def plan(
    pool: PoolSpec,
    *,
    demand: int,
    per_worker: int,
    current: int,
    now: datetime,
    history: list[DesiredPoint],
    watching_since: datetime,
) -> Plan:
    """What to do about ``pool`` with ``current`` workers (starting or ready, not draining).
    ``history``: the need's change points so far; ``watching_since``: since when this
    autoscaler (or the one before it, via the status) has been watching the pool."""
    per_worker = max(1, per_worker)
    raw = math.ceil(demand / per_worker) + (pool.buffer_workers if demand > 0 else 0)
    need = min(max(raw, pool.min_workers), pool.max_workers)
    at_max = raw > pool.max_workers
    window = timedelta(seconds=pool.scaledown_window_s)
    start = now - window
    # Change points of the window: the last one before it (its value held at the start) and
    # every one inside it, then this round's.
    kept = [p for p in history if p.at > start]
    before = [p for p in history if p.at <= start]
    if before:
        kept.insert(0, before[-1])
    if not kept or kept[-1].desired != need:
        kept.append(DesiredPoint(at=now, desired=need))
    # The most any point needed while it held within the window (the current one always).
    peak = max(p.desired for i, p in enumerate(kept) if i == len(kept) - 1 or kept[i + 1].at > start)
    saw = (f"demand {demand} job(s) at {per_worker}/worker -> {raw} worker(s)"
           f"{f' (incl. {pool.buffer_workers} buffer)' if demand > 0 and pool.buffer_workers else ''}; "
           f"bounds [{pool.min_workers}, {pool.max_workers}] -> need {need}; have {current}")
    if need > current:
        return Plan(need, need, need - current, at_max, kept, f"{saw}: scale up now")
    if need == current:
        return Plan(need, need, 0, at_max, kept, saw)
    watched = (now - watching_since).total_seconds()
    if watched < pool.scaledown_window_s:
        return Plan(current, need, 0, at_max, kept,
                    f"{saw}: surplus, watched {watched:.1f}s of the {pool.scaledown_window_s:g}s window")
    if peak >= current:
        return Plan(current, need, 0, at_max, kept,
                    f"{saw}: the scale-down window (last {pool.scaledown_window_s:g}s) needed {peak}: keep {current}")
    return Plan(peak, need, peak - current, at_max, kept,
                f"{saw}: the scale-down window (last {pool.scaledown_window_s:g}s) needed at most {peak}: "
                f"scale down to {peak}")
