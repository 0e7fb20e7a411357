"""Which pool a job counts for: the one rule the autoscaler and the control plane share."""

from __future__ import annotations

from collections.abc import Iterable

from mnemos.messages import PoolSpec

__all__ = ["pool_for"]


def pool_for(pools: Iterable[PoolSpec], runtime: str, model: str) -> PoolSpec | None:
    """The pool a job of ``runtime`` for ``model`` (``family:version``) counts for: the first
    by name that names the model, else the first that serves the runtime for every model."""
    ordered = sorted(pools, key=lambda p: p.name)
    for pool in ordered:
        if runtime in pool.runtimes and model in pool.models:
            return pool
    for pool in ordered:
        if runtime in pool.runtimes and not pool.models:
            return pool
    return None
