"""Pulling dispatch messages highest priority first, warm models first, with no polling when idle.

Layout: one durable pull consumer per (runtime, priority, model), a *level*, shared by
every worker of that runtime (work-queue streams allow exactly one consumer per filter),
created by the first worker that pulls the level. ``fetch()`` would return messages in
stream order, so priority is the worker's job, and so is the model: within a priority a
worker pulls the models it holds first, and leaves a model that a peer holds to that peer
for a moment (:mod:`neuron_runtime.affinity`).

- **Doorbell**: the worker holds a plain core subscription on
  ``mnemos.dispatch.<runtime>.>``, so every new job's publish tells it which level just
  got work, at once. An idle worker wakes on it and pulls that level as a short long-poll
  (the doorbell can arrive a hair before the stream has stored the message). Because the
  subscription exists before any sweep, no job that arrives in between can be missed.
- **Sweep** (a slot is free): the worker pulls ``no_wait`` from the levels that rang since
  the last sweep and the levels its last pull left non-empty (the pending count rides on
  every delivered message), priority 10 first, until its free slots are used: one round
  trip under load. Only when that finds nothing although a level rang, at start, and on
  idle re-checks does it ask ``STREAM.INFO`` (``subjects_filter``) for the count queued
  per subject.
- **Deferral**: a level whose model a better peer should take is skipped until its spill
  delay is up (the doorbell rings it again then); a pull that finds it drained forgets it.

Pull requests are raw ``$JS.API.CONSUMER.MSG.NEXT`` requests on one inbox, one at a time,
so a request never asks for more messages than the worker has free slots. (Delivered
messages keep their dispatch subject; only status replies carry the pull's inbox token.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as jsapi
from nats.js.errors import BadRequestError

from mnemos.connection import barrier, patiently
from mnemos.names import Names
from neuron_runtime.affinity import Affinity

__all__ = ["PriorityPuller", "Doorbell"]

log = logging.getLogger("mnemos.puller")

Level = tuple[str, int, str]  # (runtime, priority, model subject token)


@dataclass
class _Pull:
    batch: int
    done: asyncio.Future[int]
    received: int = 0
    #: The consumer's pending count after the last job delivered (from its ack subject).
    pending: int = 0


@dataclass
class Doorbell:
    """Levels that saw a new job since the last :meth:`take`, and an event to wait on."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    levels: set[Level] = field(default_factory=set)

    def ring(self, level: Level) -> None:
        self.levels.add(level)
        self.event.set()

    def take(self) -> set[Level]:
        levels, self.levels = self.levels, set()
        self.event.clear()
        return levels


class PriorityPuller:
    """Delivers dispatch messages to ``on_message`` and never more than it asked for."""

    def __init__(
        self,
        nc: NATS,
        names: Names,
        runtimes: list[str],
        on_message: Callable[[Msg], None],
        *,
        ack_wait_s: float = 30.0,
        max_deliver: int = -1,
        affinity: Affinity | None = None,
    ) -> None:
        self.nc = nc
        self.names = names
        self.runtimes = list(runtimes)
        self.on_message = on_message
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.doorbell = Doorbell()
        self._ids = itertools.count(1)
        self._pulls: dict[str, _Pull] = {}
        self._current: _Pull | None = None
        self._one_at_a_time = asyncio.Lock()
        #: Per level, how many jobs its consumer still had after our last pull there.
        self._pending: dict[Level, int] = {}
        self._last_pending = 0
        self._resync = True
        #: Levels whose doorbell rang and that no pull has found empty since.
        self._hints: set[Level] = set()
        self._inbox = ""
        self._subs: list[Subscription] = []
        self._info_subject = names.stream_info_subject(names.dispatch_stream)
        self.affinity = affinity
        #: Levels left to a better peer, and when this worker may take them after all.
        self._deferred: dict[Level, float] = {}
        #: Levels whose consumer this worker has made sure of.
        self._consumers: set[Level] = set()

    async def start(self) -> None:
        """The pull inbox and the doorbells (consumers are made when a level is first pulled)."""
        self._inbox = self.nc.new_inbox()
        self._subs.append(await self.nc.subscribe(self._inbox + ".*", cb=self._on_inbox))
        for runtime in self.runtimes:
            for subject in (self.names.dispatch_filter(runtime), self.names.ready_filter(runtime)):
                self._subs.append(await self.nc.subscribe(subject, cb=self._on_doorbell))
        await barrier(self.nc)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()
        for pull in self._pulls.values():
            if not pull.done.done():
                pull.done.set_result(pull.received)

    async def _ensure_consumer(self, level: Level) -> None:
        if level in self._consumers:
            return
        runtime, priority, model = level
        name = self.names.dispatch_consumer(runtime, priority, model)
        config = jsapi.ConsumerConfig(
            durable_name=name,
            name=name,
            description=f"MNEMOS {runtime} jobs at priority {priority} for {Names.token_model(model)}",
            filter_subject=self.names.dispatch_filter(runtime, priority, model),
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=-1,
            max_waiting=4096,
        )
        js = self.nc.jetstream()
        for attempt in range(2):
            try:
                await patiently(lambda: js.add_consumer(self.names.dispatch_stream, config), f"create consumer {name}")
                break
            except BadRequestError as e:
                if e.err_code == 10148:  # exists with another config: keep the operator's
                    log.warning("consumer %s exists with a different configuration; using it as is", name)
                    break
                if e.err_code != 10100 or attempt:  # 10100: overlaps another consumer's filter
                    raise
                await self._drop_legacy_consumer(js, runtime, priority)
        self._consumers.add(level)

    async def _drop_legacy_consumer(self, js: object, runtime: str, priority: int) -> None:
        """An older release's consumer of the whole (runtime, priority) overlaps the
        per-model ones; its unacknowledged jobs come back to the new consumers."""
        legacy = self.names.legacy_dispatch_consumer(runtime, priority)
        log.warning("deleting consumer %s of an older release (one consumer per model now)", legacy)
        try:
            await js.delete_consumer(self.names.dispatch_stream, legacy)  # type: ignore[attr-defined]
        except Exception as e:  # another worker deleted it first
            log.debug("consumer %s not deleted: %r", legacy, e)

    # ------------------------------------------------------------------ inbound

    async def _on_doorbell(self, msg: Msg) -> None:
        try:
            self.doorbell.ring(Names.parse_dispatch_subject(msg.subject))
        except (IndexError, ValueError):
            log.warning("ignoring dispatch doorbell on malformed subject %s", msg.subject)

    async def _on_inbox(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data and not msg.reply:
            # Status messages come on the pull's own reply subject: <inbox>.<rid>.
            if status == "100":  # idle heartbeat
                return
            if status not in ("404", "408"):
                log.debug("pull ended with status %s %s", status, msg.headers)
            pull = self._pulls.get(msg.subject.rpartition(".")[2])
            if pull is not None and not pull.done.done():
                pull.done.set_result(pull.received)
            return
        # A job (it keeps its dispatch subject, so it belongs to the one pull in flight).
        # A late one for a pull we stopped waiting for is still ours to run.
        self.on_message(msg)
        pull = self._current
        if pull is not None:
            pull.received += 1
            if pull.received >= pull.batch:
                try:
                    pull.pending = msg.metadata.num_pending
                except Exception:  # noqa: BLE001 - an unparsable ack subject: assume more
                    pull.pending = 1
                if not pull.done.done():
                    pull.done.set_result(pull.received)

    # ------------------------------------------------------------------ pulling

    async def pull(self, level: Level, batch: int, wait_s: float | None = None) -> int:
        """Ask one consumer for up to ``batch`` jobs; how many arrived.

        ``wait_s=None`` answers at once (``no_wait``); otherwise the server holds the
        request open up to ``wait_s`` and delivers jobs as they arrive.
        """
        if batch <= 0:
            return 0
        async with self._one_at_a_time:
            return await self._pull(level, batch, wait_s)

    async def _pull(self, level: Level, batch: int, wait_s: float | None) -> int:
        await self._ensure_consumer(level)
        runtime, priority, model = level
        rid = str(next(self._ids))
        pull = _Pull(batch=batch, done=asyncio.get_running_loop().create_future())
        self._pulls[rid] = pull
        self._current = pull
        body: dict[str, object] = {"batch": batch}
        if wait_s is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(wait_s * 1e9)
        try:
            await self.nc.publish(
                self.names.consumer_next_subject(
                    self.names.dispatch_stream, self.names.dispatch_consumer(runtime, priority, model)
                ),
                msgspec.json.encode(body),
                reply=f"{self._inbox}.{rid}",
            )
            try:
                return await asyncio.wait_for(asyncio.shield(pull.done), timeout=(wait_s or 0.0) + 5.0)
            except TimeoutError:
                log.warning("pull on %s p%d %s got no answer; continuing", runtime, priority, model)
                self._resync = True
                return pull.received
        finally:
            self._pulls.pop(rid, None)
            self._current = None
            # A full batch may have left more behind; a short one (ended by 404/408) did not.
            self._last_pending = pull.pending if pull.received >= pull.batch else 0

    async def queued(self) -> dict[Level, int]:
        """Messages in the stream per level (including ones being worked on)."""
        body = msgspec.json.encode({"subjects_filter": self.names.dispatch_all})
        reply = await self.nc.request(self._info_subject, body, timeout=5.0)
        info = msgspec.json.decode(reply.data)
        counts: dict[Level, int] = {}
        subjects = (info.get("state") or {}).get("subjects") or {}
        wanted = set(self.runtimes)
        for subject, n in subjects.items():
            try:
                level = Names.parse_dispatch_subject(subject)
            except (IndexError, ValueError):
                continue
            if level[0] in wanted:
                counts[level] = counts.get(level, 0) + int(n)
        return counts

    async def pull_rung(self, levels: set[Level], free: int, wait_s: float) -> int:
        """After the doorbell woke an idle worker: pull the rung levels, highest priority
        first, warm models first, each as a long poll of up to ``wait_s`` (jobs that arrive
        meanwhile are delivered through it at once). No ``STREAM.INFO`` round trip on this
        path. A level left to a better peer is kept as a hint for the next sweep."""
        taken = 0
        for level in self._by_priority(levels):
            if taken >= free:
                break
            if self._defers(level):
                self._hints.add(level)
                continue
            # A level whose spill delay is up was stored long ago: no long poll for it.
            got = await self.pull(level, free - taken, None if level in self._deferred else wait_s)
            if got < free - taken:
                self._deferred.pop(level, None)
            taken += got
        return taken

    async def sweep(self, free: int, rung: set[Level] | None = None) -> int:
        """Fill up to ``free`` slots, highest priority first; how many jobs arrived.

        Where to look comes from what the worker already knows, so a sweep under load is
        one ``no_wait`` pull: levels whose doorbell rang (``rung``, kept until a pull finds
        the level drained) and levels whose last pull said more were pending.
        ``STREAM.INFO`` is asked only when that finds nothing although a rung level should
        have had a job (its publish can ring a hair before the stream stores it), at
        start, and on :meth:`resync`. Levels left to a better peer keep their hints.
        """
        if free <= 0:
            return 0
        self._hints |= rung or set()
        candidates = self._hints | {level for level, n in self._pending.items() if n > 0}
        taken = 0
        suspects: set[Level] = set()
        for level in self._by_priority(candidates):
            if self._defers(level):
                continue
            want = free - taken
            got = await self._pull_level(level, want, None)
            if got < want:  # drained (a level left unvisited keeps its hint)
                if got == 0 and level in self._hints:
                    suspects.add(level)
                self._hints.discard(level)
            taken += got
            if taken >= free:
                return taken
        if taken or not (suspects or self._resync):
            return taken
        self._resync = False
        counts = await self.queued()
        for level in self._by_priority(set(counts) | suspects):
            if self._defers(level):
                self._hints.add(level)
                continue
            n = counts.get(level, 0)
            # A rung level the stream does not show yet gets a short waiting pull.
            taken += await self._pull_level(level, free - taken, None if n > 0 else 0.05)
            if taken >= free:
                break
        return taken

    def resync(self) -> None:
        """Ask the stream what is queued at the next sweep (after reconnects, idle re-checks),
        and make sure again of each level's consumer when it is next pulled (one that was
        deleted meanwhile is made anew)."""
        self._resync = True
        self._consumers.clear()

    def _by_priority(self, levels: set[Level]) -> list[Level]:
        """Highest priority first; within a priority, the models this worker holds first."""
        order = {rt: i for i, rt in enumerate(self.runtimes)}
        affinity = self.affinity
        if affinity is None:
            return sorted(levels, key=lambda lv: (-lv[1], order.get(lv[0], 99)))
        return sorted(levels, key=lambda lv: (-lv[1], affinity.cost_here(Names.token_model(lv[2])),
                                              order.get(lv[0], 99)))

    def _defers(self, level: Level) -> bool:
        """Whether to leave ``level`` to a better peer for now. The first time it says so
        it rings the level's doorbell for when the spill delay is up; from then on the
        level is taken (until a pull finds it drained, which forgets the deferral)."""
        if self.affinity is None:
            return False
        loop = asyncio.get_running_loop()
        due = self._deferred.get(level)
        if due is not None:
            return loop.time() < due
        delay = self.affinity.defer_s(level[0], Names.token_model(level[2]))
        if delay <= 0:
            return False
        self._deferred[level] = loop.time() + delay
        loop.call_later(delay, self.doorbell.ring, level)
        return True

    async def _pull_level(self, level: Level, batch: int, wait_s: float | None) -> int:
        got = await self.pull(level, batch, wait_s)
        self._pending[level] = self._last_pending if got else 0
        if got < batch:  # drained: the next job of this level is rated afresh
            self._deferred.pop(level, None)
        return got
