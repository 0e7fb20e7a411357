"""Warm routing without a router: a job goes first to a worker that holds its model.

Every model has its own dispatch consumers (one per runtime and priority), so a worker can
pull one model's jobs. Every worker hears every other worker's record on the heartbeat
subjects (published at each heartbeat and at once when a model is loaded or evicted), so
each knows who holds what. When a job's doorbell rings, each worker with a free slot rates
itself for that model:

- 0: it holds the model (warm);
- 1: it does not, but has room for it (loading evicts nothing);
- 2: loading it would evict a model it holds.

A worker that is not the best (some live peer of the runtime with a free slot rates lower)
waits ``spill_delay_s`` before pulling that model's jobs; the better worker takes them in
the meantime. If it does not (saturated: its free slots were used up since its last
record, or it is gone), the job spills to the waiting worker after the delay. So the cost
of a wrong guess is the delay, never a stuck job, and with no better peer there is no
delay at all. The warm worker's own pull is immediate: no extra hop, no central state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mnemos.messages import WorkerRecord

__all__ = ["Affinity", "WARM", "ROOM", "EVICT"]

WARM, ROOM, EVICT = 0, 1, 2

#: A peer whose record is older than this many of its heartbeat intervals is not counted.
_STALE_BEATS = 3.0


@dataclass(slots=True)
class _Peer:
    record: WorkerRecord
    heard: float


class Affinity:
    """This worker's view of who should take a model's jobs first."""

    def __init__(
        self,
        worker_id: str,
        local: Callable[[], tuple[set[str], int]],
        *,
        spill_delay_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``local()`` answers (the models loaded here, how many fit at once)."""
        self.worker_id = worker_id
        self.local = local
        self.spill_delay_s = spill_delay_s
        self.clock = clock
        self._peers: dict[str, _Peer] = {}

    def heard(self, record: WorkerRecord, *, age_s: float = 0.0) -> None:
        """A worker's record (its heartbeat, or a change it announced), heard ``age_s`` after
        it was written (a record read back from the bucket may be a dead worker's last)."""
        if record.worker_id == self.worker_id:
            return
        if record.status in ("stopped", "error"):
            self._peers.pop(record.worker_id, None)
            return
        self._peers[record.worker_id] = _Peer(record, self.clock() - max(0.0, age_s))

    @property
    def peers(self) -> set[str]:
        """The workers heard from (live or not yet found stale)."""
        return set(self._peers)

    def cost_here(self, model: str) -> int:
        loaded, fits = self.local()
        return _cost(model, loaded, fits)

    def best_peer_cost(self, runtime: str, model: str) -> int | None:
        """The lowest rating for ``model`` among live peers of ``runtime`` with a free slot."""
        now = self.clock()
        best: int | None = None
        for worker_id, peer in list(self._peers.items()):
            rec = peer.record
            if now - peer.heard > _STALE_BEATS * rec.heartbeat_interval_s:
                del self._peers[worker_id]
                continue
            if rec.status not in ("idle", "busy") or rec.free_slots <= 0 or runtime not in rec.runtimes:
                continue
            cost = _cost(model, set(rec.loaded_models), rec.max_loaded_models)
            if best is None or cost < best:
                best = cost
        return best

    def defer_s(self, runtime: str, model: str) -> float:
        """How long this worker should leave ``model``'s new jobs to a better peer (0: take them now)."""
        here = self.cost_here(model)
        if here == WARM:
            return 0.0
        best = self.best_peer_cost(runtime, model)
        return self.spill_delay_s if best is not None and best < here else 0.0


def _cost(model: str, loaded: set[str], fits: int) -> int:
    if model in loaded:
        return WARM
    # fits == 0: the worker did not say (an older record): assume it has room.
    return ROOM if fits <= 0 or len(loaded) < fits else EVICT
