"""Model-based test of :mod:`mnemos.lifecycle` over random interleavings, with no NATS.

One job record lives in a simulated KV bucket with revisions. Every writer does what the
real callers do (``neuron_runtime.executor.Executor._write``, ``JobStore.mutate``): it
applies a lifecycle transition to a *copy* of the record it last read, writes it with a
compare-and-set on that read's revision, and on a conflict re-reads and re-applies. Writers
start from stale revisions on purpose: a worker claims from the record carried in its
dispatch message and writes from its own last write; the control plane reads a revision or
two behind (a lagging replica), and its reaper decides from a job index that may lag
several revisions, or still show an earlier attempt of the job, and names the worker,
attempt or generation it saw there.

Dispatch messages are modelled as JetStream keeps them: each has a generation (the
record's ``dispatch`` when it was queued), the record snapshot and revision it was queued
with, and a delivery count (a delivery after the first is ``redelivered``). A live message
may be delivered at any time to any of three workers (its ack wait ran out, a nak, or a
duplicate of the same generation sent by the reaper's redispatch), so the machine explores
duplicate deliveries, two workers claiming the same generation, a redelivery while the
first worker still runs, a cancel racing a finish, a worker presumed dead whose late finish
arrives after recovery, crashes and drains. Workers ack/nak as the executor does; the
control plane queues a new message whenever a transition queues the job in a new
generation; ``retrying`` and ``hand_back`` come back as redeliveries of the same message.
The clock is simulated and only moves forward.

Checked after every step (``DESIGN.md`` section 3, the :mod:`mnemos.lifecycle` docstring):

- a terminal record never changes again, except by ``requeue_by_request`` (``jobs.retry``)
  of a failed/timeout/cancelled job, which queues it in the next generation with its
  attempt history kept; a terminal state is reached at most once per generation;
- attempts are never removed or rewritten: each revision's attempts extend the previous
  revision's (same numbers, a closed attempt never changes, an open one only gains phases
  and then its end), one attempt at most is added per write; they are numbered 1..n and
  ``record.attempt == len(attempts)``;
- at most one attempt is open, and only the last one; an attempt is open exactly when the
  status is held (``loading_model``/``running``/``streaming``/``cancelling``), and then
  ``worker_id`` is that attempt's worker;
- a ``cancelling`` job only ever becomes ``cancelled`` (never ``completed``, in its generation);
- ``dead_letter`` exactly when the job ended ``failed``/``timeout`` (not a queue timeout)
  with its retry policy used up; ``retrying`` only within the policy; an attempt ends
  ``timeout`` only after the job's ``timeout_seconds``;
- ``dispatch`` only grows, by one, when the control plane queues the job again (a hand
  back keeps its generation: its message comes back);
- a transition aimed at a worker, an attempt or a generation changes the record only if
  that worker holds it, that attempt is the open one, that generation is current; a first
  (not redelivered) delivery never takes a held job over;
- a transition that declines (False/None/STALE/FINISHED, or raises NotCancellable /
  InvalidState) leaves the record exactly as it was;
- the job is never lost: while it is not terminal a live message of its generation exists;
  and at the end of every run, with every worker finishing what it holds, it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mnemos import lifecycle
from mnemos.errors import (
    ExecutionError,
    InvalidState,
    JobCancelled,
    JobTimeout,
    MnemosError,
    ModelLoadError,
    NotCancellable,
)
from mnemos.lifecycle import Claim
from mnemos.messages import (
    ErrorInfo,
    JobOutput,
    JobRecord,
    JobSpec,
    ModelRef,
    RetryPolicy,
    Timings,
    decode,
    encode,
)
from mnemos.retry import failures, policy_for

WORKERS = ("w1", "w2", "w3")
T0 = datetime(2025, 1, 1, tzinfo=UTC)
#: How far back (in revisions) a control-plane read may lag (a replica behind) ...
MAX_LAG = 2
#: ... and the reaper's job index (it follows the bucket's updates); ``PREVIOUS_ATTEMPT``:
#: the index still shows the job as it was held in its previous attempt.
INDEX_LAG = 5
PREVIOUS_ATTEMPT = -1
# The rules' own statement of the lifecycle (DESIGN.md section 3), not lifecycle's constants:
#: statuses in which a worker holds the job (its attempt is open) ...
HELD = frozenset({"acquired", "loading_model", "running", "streaming", "cancelling"})
#: ... the end states ...
TERMINAL = frozenset({"completed", "failed", "timeout", "cancelled"})
#: ... and the ones ``jobs.retry`` may queue again.
RETRYABLE_BY_REQUEST = frozenset({"failed", "timeout", "cancelled"})
#: Outcomes an attempt may end with (``Attempt.outcome``).
ATTEMPT_OUTCOMES = {"completed", "failed", "timeout", "cancelled", "lost", "handed_back"}


def copy(rec: JobRecord) -> JobRecord:
    """A deep copy, as a writer gets it from the bucket (or from its dispatch message)."""
    return decode(encode(rec), JobRecord)


@dataclass
class Message:
    """A dispatch message in the work queue: the job as queued and the revision it was queued at."""

    seq: int
    generation: int
    snapshot: bytes
    revision: int
    deliveries: int = 0


@dataclass
class Execution:
    """One worker's hold on the job (the executor's ``Execution``)."""

    msg: int
    generation: int
    record: JobRecord
    revision: int


@dataclass
class Write:
    """One successful compare-and-set: which transition, the record before and after, and
    whom the transition was aimed at (the worker, attempt or generation it names)."""

    name: str
    prev: JobRecord
    new: JobRecord
    worker: str | None = None
    attempt: int | None = None
    generation: int | None = None


#: What a worker's run ended with: (outcome, error, output).
RUN_ENDS: dict[str, tuple[str, ErrorInfo | None, JobOutput | None]] = {
    "completed": ("completed", None, JobOutput(result="ok")),
    "failed": ("failed", ExecutionError("boom").info(), None),  # not retryable by default
    "failed_retryable": ("failed", ModelLoadError("no memory").info(), None),
    "timeout": ("timeout", JobTimeout("too slow").info(), None),
    "cancelled": ("cancelled", JobCancelled("stopped").info(), None),
}


class LifecycleMachine(RuleBasedStateMachine):
    """One job, three workers, a control plane and its reaper, racing on one KV key."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.rec: JobRecord | None = None
        self.rec_json = b""  # what was stored, to check that nothing modifies a stored record
        self.rev = 0
        self.history: list[tuple[int, JobRecord]] = []
        self.writes: list[Write] = []
        self.messages: dict[int, Message] = {}
        self.next_seq = 1
        self.execs: dict[str, Execution] = {}
        self.terminal_reached: dict[int, int] = {}
        self.cancelling_in: set[int] = set()

    # ------------------------------------------------------------------ the bucket

    @property
    def current(self) -> JobRecord:
        assert self.rec is not None
        return self.rec

    def _put(self, new: JobRecord, write: Write) -> JobRecord:
        """Store ``new`` as the next revision. Stored records are never modified (every
        writer changes a copy), so reads, history and writers share them."""
        stored = copy(new)
        write.prev, write.new = self.current, stored
        self.rec, self.rec_json = stored, encode(stored)
        self.rev += 1
        self.history.append((self.rev, stored))
        self.writes.append(write)
        return stored

    def _read(self, lag: int) -> tuple[JobRecord, int]:
        """A read that may be ``lag`` revisions behind (or, with ``PREVIOUS_ATTEMPT``, the
        last revision that shows an earlier attempt held, in the status the job has now if
        there is one)."""
        if lag == PREVIOUS_ATTEMPT:  # the same status as now if it had one then (ABA), else any held one
            attempt, status = self.current.attempt, self.current.status
            earlier = [(rev, rec) for rev, rec in self.history if rec.attempt < attempt and rec.status in HELD]
            for rev, rec in sorted(earlier, key=lambda e: (e[1].status == status, e[0]), reverse=True)[:1]:
                return rec, rev
            lag = 0
        rev, rec = self.history[max(0, len(self.history) - 1 - lag)]
        return rec, rev

    def _cas(
        self,
        name: str,
        rec: JobRecord,
        rev: int,
        change: Callable[[JobRecord], bool],
        *,
        worker: str | None = None,
        attempt: int | None = None,
        generation: int | None = None,
    ) -> tuple[bool, JobRecord, int]:
        """Apply ``change`` to a copy of ``rec`` (read at ``rev``) and compare-and-set it;
        on a conflict re-read and re-apply. (written?, the record last read or written, its
        revision). A change that declines or raises must leave its copy as it was."""
        for _ in range(20):
            new = copy(rec)
            before = encode(new)
            try:
                applied = change(new)
            except MnemosError:
                assert encode(new) == before, f"{name} raised but changed the record"
                raise
            if not applied:
                assert encode(new) == before, f"{name} declined but changed the record"
                return False, rec, rev
            if rev == self.rev:
                new.updated_at = self.now
                stored = self._put(new, Write(name, rec, new, worker, attempt, generation))
                return True, stored, self.rev
            rec, rev = self.current, self.rev  # conflict: re-read (fresh) and re-apply
        raise AssertionError(f"{name}: compare-and-set never won")

    # ------------------------------------------------------------------ messages

    def _queue(self, rec: JobRecord, rev: int) -> None:
        """A dispatch message for the job as it is now (its generation)."""
        self.messages[self.next_seq] = Message(self.next_seq, rec.dispatch, encode(rec), rev)
        self.next_seq += 1

    def _ack(self, seq: int) -> None:
        self.messages.pop(seq, None)

    def _live(self, i: int) -> Message:
        seqs = sorted(self.messages)
        return self.messages[seqs[i % len(seqs)]]

    def _busy(self, i: int) -> str:
        busy = sorted(self.execs)
        return busy[i % len(busy)]

    # ------------------------------------------------------------------ setup

    @initialize(
        max_retries=st.integers(0, 2),
        retry_on=st.sampled_from([None, ["execution_error"], ["worker_lost", "timeout"]]),
        timeout_s=st.sampled_from([1.0, 5.0, 30.0]),
        queue_timeout_s=st.sampled_from([None, 10.0]),
    )
    def submit(self, max_retries: int, retry_on: list[str] | None, timeout_s: float,
               queue_timeout_s: float | None) -> None:
        spec = JobSpec(
            model=ModelRef(family="demo-fn", version="v1"),
            timeout_seconds=timeout_s,
            queue_timeout_seconds=queue_timeout_s,
            retry_config=RetryPolicy(strategy="fixed", max_retries=max_retries, initial_delay_seconds=0.5,
                                     jitter=False, retry_on_errors=retry_on),
        )
        rec = lifecycle.accept(spec, "python", self.now, tenant=None, reply_to=None)
        assert rec.status == "queued" and rec.attempt == 0 and not rec.attempts and rec.dispatch == 0
        self.rec = copy(rec)
        self.rec_json = encode(self.rec)
        self.rev = 1
        self.history = [(1, self.rec)]
        self._queue(rec, 1)

    # ------------------------------------------------------------------ workers

    @precondition(lambda self: bool(self.messages))
    @rule(i=st.integers(0, 7), worker=st.sampled_from(WORKERS), warm=st.booleans())
    def deliver(self, i: int, worker: str, warm: bool) -> None:
        """JetStream delivers a live message (any: stale ones too) to ``worker``."""
        self._deliver(self._live(i), worker, warm)

    def _current_messages(self) -> list[Message]:
        """Live messages of the job's current generation that a claim could act on: any while
        it waits, only never-delivered duplicates while a worker holds it (a redelivery that
        takes the job over from its holder is left to ``deliver``, or it would be the rule)."""
        if self.rec is None:
            return []
        waiting = self.rec.status not in HELD
        return [m for m in self.messages.values()
                if m.generation == self.rec.dispatch and (waiting or m.deliveries == 0)]

    @precondition(lambda self: bool(self._current_messages()))
    @rule(worker=st.sampled_from(WORKERS), warm=st.booleans())
    def deliver_current(self, worker: str, warm: bool) -> None:
        """JetStream delivers a message of the job's current generation: one never delivered
        if there is one (a duplicate's first delivery), else the newest."""
        self._deliver(max(self._current_messages(), key=lambda m: (m.deliveries == 0, m.seq)), worker, warm)

    def _deliver(self, msg: Message, worker: str, warm: bool) -> None:
        """``worker`` gets ``msg`` and claims the job from the record carried in it (the
        executor's ``handle`` and ``_claim``)."""
        redelivered = msg.deliveries > 0
        msg.deliveries += 1
        held = self.execs.get(worker)
        if held is not None:
            if msg.generation == held.generation:
                held.msg = msg.seq  # redelivered to the worker that runs it: this one to ack
            # else: nak'ed, it comes back later
            return
        ex = Execution(msg=msg.seq, generation=msg.generation, record=decode(msg.snapshot, JobRecord),
                       revision=msg.revision)
        outcome = Claim.STALE

        def claim(rec: JobRecord) -> bool:
            nonlocal outcome
            before_attempts = len(rec.attempts)
            held_before = bool(rec.attempts) and rec.attempts[-1].ended_at is None
            outcome = lifecycle.claim(rec, worker, self.now, generation=ex.generation, redelivered=redelivered,
                                      warm=warm, dispatch_seq=msg.seq)
            if outcome is Claim.TAKEN:
                assert rec.status == ("running" if warm else "loading_model")
                assert rec.attempts[-1].worker_id == worker and rec.attempts[-1].ended_at is None
                assert len(rec.attempts) == before_attempts + 1
            elif outcome is Claim.ENDED:  # only a takeover: the open attempt recorded lost
                assert rec.terminal and redelivered and rec.attempts[-1].outcome == "lost"
            if held_before and not redelivered:  # a duplicate first delivery: another worker runs it
                assert outcome in (Claim.STALE, Claim.FINISHED), f"a first delivery took over: {outcome}"
            return outcome in (Claim.TAKEN, Claim.ENDED)

        _, ex.record, ex.revision = self._cas("claim", ex.record, ex.revision, claim, generation=ex.generation)
        if outcome is Claim.TAKEN:
            self.execs[worker] = ex
        else:
            self._ack(msg.seq)

    @precondition(lambda self: bool(self.execs))
    @rule(i=st.integers(0, 2), phase=st.sampled_from(["running", "streaming"]))
    def enter_phase(self, i: int, phase: str) -> None:
        worker = self._busy(i)
        ex = self.execs[worker]
        _, ex.record, ex.revision = self._cas(
            "enter_phase", ex.record, ex.revision, lambda r: lifecycle.enter_phase(r, worker, phase, self.now),
            worker=worker, attempt=ex.record.attempt)

    def _finish(self, worker: str, end: str) -> None:
        """The executor's ``_conclude``: retry_in from its own copy, finish by compare-and-set,
        then ack (done, or no longer its message to run) or nak (retrying)."""
        ex = self.execs.pop(worker)
        outcome, error, output = RUN_ENDS[end]
        attempt = ex.record.attempt
        if outcome == "timeout":  # its asyncio.timeout fires at the deadline, not before
            deadline = ex.record.attempts[-1].started_at + timedelta(seconds=ex.record.spec.timeout_seconds)
            self.now = max(self.now, deadline)
        retry_after = lifecycle.retry_in(ex.record, outcome, error)
        final: str | None = None

        def finish(rec: JobRecord) -> bool:
            nonlocal final
            final = lifecycle.finish(rec, worker, attempt, self.now, outcome=outcome, output=output, error=error,
                                     timings=Timings(), retry_after=retry_after)
            assert final is None or final == rec.status
            return final is not None

        written, ex.record, ex.revision = self._cas("finish", ex.record, ex.revision, finish,
                                                    worker=worker, attempt=attempt)
        assert written == (final is not None)
        if final is None:
            if ex.record.terminal or ex.record.dispatch != ex.generation:
                self._ack(ex.msg)
        elif final != "retrying":
            assert ex.record.terminal
            self._ack(ex.msg)
        # retrying: nak'ed, the same message comes back

    @precondition(lambda self: bool(self.execs))
    @rule(i=st.integers(0, 2), end=st.sampled_from(sorted(RUN_ENDS)))
    def finish(self, i: int, end: str) -> None:
        self._finish(self._busy(i), end)

    @precondition(lambda self: bool(self.execs))
    @rule(i=st.integers(0, 2), end=st.sampled_from(sorted(RUN_ENDS)), cancel_first=st.booleans())
    def cancel_races_finish(self, i: int, end: str, cancel_first: bool) -> None:
        """``jobs.cancel`` and a worker's end of its attempt, back to back in either order
        (the worker decided on its outcome, and its retry, before it saw the cancel)."""
        worker = self._busy(i)
        if cancel_first:
            self._cp_cancel(self.current, *self._read(0))
            self._finish(worker, end)
        else:
            self._finish(worker, end)
            self._cp_cancel(self.current, *self._read(0))

    @precondition(lambda self: bool(self.execs))
    @rule(i=st.integers(0, 2))
    def hand_back(self, i: int) -> None:
        """A draining worker gives the job back; its message is nak'ed either way."""
        worker = self._busy(i)
        ex = self.execs.pop(worker)
        attempt = ex.record.attempt
        self._cas("hand_back", ex.record, ex.revision, lambda r: lifecycle.hand_back(r, worker, attempt, self.now),
                  worker=worker, attempt=attempt)

    @precondition(lambda self: bool(self.execs))
    @rule(i=st.integers(0, 2))
    def crash(self, i: int) -> None:
        """kill -9: the execution is gone without a word; its message stays unacked."""
        del self.execs[self._busy(i)]

    # ------------------------------------------------------------------ control plane

    def _settled(self, record: JobRecord, revision: int) -> None:
        """The reaper's ``settle`` after a change: drop the ended attempt's message, queue
        the job again if it says queued (a new generation)."""
        if record.attempts and record.attempts[-1].dispatch_seq is not None:
            self._ack(record.attempts[-1].dispatch_seq)
        if record.status == "queued":
            self._queue(record, revision)

    def _actions(self, seen: JobRecord) -> list[str]:
        """What the control plane may do about the job as it read it (maybe stale)."""
        actions = []
        if seen.terminal:
            actions.append("retry")
        else:
            actions.append("cancel")
        if seen.status in HELD:
            actions.append("lose")
            if (self.now - seen.attempts[-1].started_at).total_seconds() > seen.spec.timeout_seconds:
                actions.append("expire")
        if seen.status == "cancelling":
            actions.append("confirm_cancel")
        if seen.status in ("queued", "retrying"):
            actions += ["sweep", "sweep"]  # nothing to do (keeps waiting jobs from being cancelled at once)
        if seen.status == "queued":
            actions.append("redispatch")
            qt = seen.spec.queue_timeout_seconds
            if qt is not None and (self.now - seen.updated_at).total_seconds() > qt:
                actions.append("expire_in_queue")
        return actions

    @rule(
        k=st.integers(0, 5),
        index_lag=st.sampled_from([0, 0, 0, 1, 3, INDEX_LAG, PREVIOUS_ATTEMPT]),
        lag=st.sampled_from([0, 0, 1, MAX_LAG]),
        wait=st.sampled_from([0.0, 0.0, 3.0, 40.0]),
    )
    def control_plane(self, k: int, index_lag: int, lag: int, wait: float) -> None:
        """One thing the control plane or its reaper does, ``wait`` seconds later (a later
        sweep): the reaper decides from its job index, which may be ``index_lag`` revisions
        behind, and names the worker/attempt/generation it saw there; the write starts from
        a read ``lag`` revisions behind (``JobStore.mutate``)."""
        self.now += timedelta(seconds=wait)
        seen, _ = self._read(index_lag)
        base, rev = self._read(lag)
        actions = self._actions(seen)
        getattr(self, f"_cp_{actions[k % len(actions)]}")(seen, base, rev)

    def _cp_cancel(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """``jobs.cancel``."""
        try:
            self._cas("request_cancel", base, rev, lambda r: lifecycle.request_cancel(r, "stop it"))
        except NotCancellable:
            pass

    def _cp_retry(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """``jobs.retry``: queued again in a new generation, a new message."""

        def requeue(r: JobRecord) -> bool:
            lifecycle.requeue_by_request(r)
            return True

        try:
            _, record, revision = self._cas("requeue_by_request", base, rev, requeue)
        except InvalidState:
            return
        self._queue(record, revision)

    def _cp_lose(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """The reaper finds the job's holder (per its maybe stale index) dead, or presumes a
        partitioned worker dead that may still finish later."""
        worker = seen.worker_id or ""
        written, record, revision = self._cas("lose_attempt", base, rev,
                                              lambda r: lifecycle.lose_attempt(r, worker, self.now), worker=worker)
        if written:
            self._settled(record, revision)

    def _cp_expire(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """The reaper sees an attempt past its timeout (and grace) and ends it."""
        attempt = seen.attempt
        written, record, revision = self._cas("expire_attempt", base, rev,
                                              lambda r: lifecycle.expire_attempt(r, attempt, self.now), attempt=attempt)
        if written:
            self._settled(record, revision)

    def _cp_confirm_cancel(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """The reaper ends a ``cancelling`` job whose worker did not confirm in time."""
        attempt = seen.attempt
        written, record, revision = self._cas("confirm_cancel", base, rev,
                                              lambda r: lifecycle.confirm_cancel(r, attempt, self.now), attempt=attempt)
        if written:
            self._settled(record, revision)

    def _cp_expire_in_queue(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """The reaper ends a job that waited in the queue past its queue timeout."""
        generation, waited = seen.dispatch, (self.now - seen.updated_at).total_seconds()
        written, record, revision = self._cas("expire_in_queue", base, rev,
                                              lambda r: lifecycle.expire_in_queue(r, generation, waited),
                                              generation=generation)
        if written:
            self._settled(record, revision)

    def _cp_sweep(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """A sweep that finds nothing to do."""

    def _cp_redispatch(self, seen: JobRecord, base: JobRecord, rev: int) -> None:
        """The reaper's requeue check (``_ensure_dispatched``) finds a queued job and sends its
        message again: a duplicate of the same generation when the first one was there."""
        current = self.current
        if current.status == "queued" and current.dispatch == seen.dispatch:  # it re-reads first
            self._queue(current, self.rev)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def writes_are_legal(self) -> None:
        assert self.rec is None or encode(self.rec) == self.rec_json, "a stored record was modified in place"
        for w in self.writes:
            self._check_write(w)
        self.writes.clear()

    def _check_write(self, w: Write) -> None:
        prev, new = w.prev, w.new
        ctx = f"{w.name}: {prev.status} -> {new.status}"
        # terminal is final, except jobs.retry
        if prev.status in TERMINAL:
            assert w.name == "requeue_by_request", f"terminal record changed by {ctx}"
        if w.name == "requeue_by_request":
            assert prev.status in RETRYABLE_BY_REQUEST, ctx
            assert new.status == "queued" and new.dispatch == prev.dispatch + 1, ctx
            assert encode(new.attempts) == encode(prev.attempts), f"{ctx} rewrote the attempts"
        # dispatch generations: only up, by one, when queued again
        assert new.dispatch in (prev.dispatch, prev.dispatch + 1), ctx
        if new.dispatch != prev.dispatch:
            assert new.status == "queued", f"new generation {new.dispatch} but {ctx}"
        if new.status == "queued" and prev.status != "queued":
            # the control plane queues the job anew (new message, new generation); a worker
            # handing it back naks its message, which comes back in the same generation
            want = prev.dispatch if w.name == "hand_back" else prev.dispatch + 1
            assert new.dispatch == want, f"{ctx} in generation {new.dispatch}, not {want}"
        # a terminal state once per generation
        if new.status in TERMINAL and prev.status not in TERMINAL:
            count = self.terminal_reached.get(new.dispatch, 0) + 1
            self.terminal_reached[new.dispatch] = count
            assert count == 1, f"generation {new.dispatch} reached a terminal state {count} times ({ctx})"
        # cancelling ends cancelled
        if prev.status == "cancelling":
            assert new.status == "cancelled", f"a cancelling job became {new.status} ({ctx})"
        if new.status == "cancelling":
            self.cancelling_in.add(new.dispatch)
        if new.status == "completed":
            assert new.dispatch not in self.cancelling_in, f"generation {new.dispatch} was cancelling, then completed"
        # attempts only grow; what is recorded stays recorded
        assert len(prev.attempts) <= len(new.attempts) <= len(prev.attempts) + 1, f"{ctx}: attempts removed/jumped"
        for old, cur in zip(prev.attempts, new.attempts, strict=False):
            assert (old.attempt, old.worker_id, old.started_at, old.dispatch_seq) == (
                cur.attempt, cur.worker_id, cur.started_at, cur.dispatch_seq), f"{ctx} rewrote attempt {old.attempt}"
            if old.ended_at is not None:
                assert encode(old) == encode(cur), f"{ctx} changed closed attempt {old.attempt}"
            else:
                assert encode(cur.phases[: len(old.phases)]) == encode(old.phases), f"{ctx} rewrote phases"
        assert new.attempt >= prev.attempt, ctx
        # a transition aimed at a worker, attempt or generation applies only to that one
        if w.worker is not None:
            assert prev.status in HELD and prev.worker_id == w.worker, f"{ctx} by {w.worker}, not the holder"
        if w.attempt is not None:
            assert prev.status in HELD and prev.attempt == w.attempt, f"{ctx} for attempt {w.attempt}"
        if w.generation is not None:
            assert prev.dispatch == w.generation, f"{ctx} from a generation-{w.generation} message"

    @invariant()
    def record_is_consistent(self) -> None:
        if self.rec is None:
            return
        rec = self.rec
        n = len(rec.attempts)
        assert [a.attempt for a in rec.attempts] == list(range(1, n + 1)), "attempts not numbered 1..n"
        assert rec.attempt == n, f"record.attempt {rec.attempt} but {n} attempts"
        open_ = [i for i, a in enumerate(rec.attempts) if a.ended_at is None]
        assert open_ in ([], [n - 1]), f"open attempts at {open_} of {n}"
        held = rec.status in HELD
        assert bool(open_) == held, f"status {rec.status} with open attempts {open_}"
        if held:
            assert rec.worker_id == rec.attempts[-1].worker_id, "held by a worker that is not the attempt's"
        for a in rec.attempts:
            if a.ended_at is not None:
                assert a.outcome in ATTEMPT_OUTCOMES and a.ended_at >= a.started_at, a
                assert a.phases and a.phases[-1].name == a.outcome, a
            else:
                assert a.outcome is None
            if a.outcome == "timeout":
                assert a.ended_at is not None
                ran = (a.ended_at - a.started_at).total_seconds()
                assert ran >= rec.spec.timeout_seconds, f"attempt {a.attempt} timed out after {ran}s"
        exhausted = failures(rec) > policy_for(rec.spec).max_retries
        queue_timeout = rec.error is not None and rec.error.code == "queue_timeout"
        if rec.dead_letter:
            assert rec.status in ("failed", "timeout") and exhausted, f"dead letter but {rec.status}"
        elif rec.status in ("failed", "timeout") and exhausted:
            assert queue_timeout, f"{rec.status} with its retries used up, but not a dead letter"
        if rec.status == "retrying":
            assert not exhausted and rec.attempts[-1].outcome in ("failed", "timeout"), "retrying past its policy"

    @invariant()
    def job_is_never_lost(self) -> None:
        if self.rec is None or self.rec.status in TERMINAL:
            return
        gens = {m.generation for m in self.messages.values()}
        assert self.rec.dispatch in gens, (
            f"{self.rec.status} job (generation {self.rec.dispatch}) has no live message (live: {sorted(gens)})")

    def _check(self) -> None:
        self.writes_are_legal()
        self.record_is_consistent()
        self.job_is_never_lost()

    def teardown(self) -> None:
        """Every job ends: every worker finishes what it holds, a holder that is gone is
        recovered, a waiting job's message is delivered."""
        if self.rec is None or sys.exc_info()[1] is not None:
            return  # a step failed: that is the report, not what a drain of a broken state does
        for _ in range(12):
            rec = self.current
            if rec.terminal:
                return
            if rec.status in HELD:
                holder = self.execs.get(rec.worker_id or "")
                if holder is not None and holder.record.attempt == rec.attempt:
                    self._finish(rec.worker_id or "", "completed")
                else:
                    self._cp_lose(self.current, *self._read(0))
            else:
                for worker in sorted(self.execs):
                    self._finish(worker, "completed")  # stale: declines
                    self._check()
                self._deliver(next(m for m in self.messages.values() if m.generation == rec.dispatch), WORKERS[0], True)
            self._check()
        raise AssertionError(f"the job did not end: {self.current.status}")


# About 10k steps: some 5 s on one core. Rare interleavings (a stale reaper index across a
# whole cancel/retry/claim/cancel cycle) need more: raise max_examples locally to hunt.
LifecycleMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycleModel = LifecycleMachine.TestCase
