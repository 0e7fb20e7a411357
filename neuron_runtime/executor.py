"""Running one dispatch message: claim -> load -> run -> stream -> record -> reply -> ack.

Every write to the job record is a compare-and-set on the revision this worker last saw.
The claim uses the revision carried in the dispatch message, so a warm job costs two KV
writes (claim, result) and no read; a ``jobs.run`` job whose record nobody has written yet
(revision 0, first delivery, model in memory) costs one: its claim is *deferred*. It runs at
once, and the claim is written only if the run outlives ``claim_delay_s``; a job that ends
sooner records its claim and its result in one compare-and-set (see :meth:`Executor._claim`).

When a write loses (the control plane cancelled the job, another worker took over a
redelivered message, or a duplicate delivery already finished), the executor re-reads the
record and decides again from what it finds, by the rules of :mod:`mnemos.lifecycle`; it
never overwrites a terminal state.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mnemos.errors import (
    Conflict,
    ExecutionError,
    JobCancelled,
    JobNotFound,
    JobTimeout,
    MnemosError,
    ValidationFailed,
)
from mnemos.jobstore import JobStore
from mnemos import lifecycle
from mnemos.messages import (
    Dispatch,
    ErrorInfo,
    JobOutput,
    JobRecord,
    ResultChunk,
    ResultFinal,
    decode_result,
    ResultStatus,
    Timings,
    decode,
    encode,
    utcnow,
)
from mnemos.names import HDR_RECORD_FOLLOWS, Names
from mnemos.tasks import Supervisor
from neuron_runtime.metrics import WorkerMetrics
from neuron_runtime.pool import ModelPool, pool_key
from neuron_runtime.runtimes.base import ExecutionContext

__all__ = ["Executor", "Execution"]

log = logging.getLogger("mnemos.executor")

#: How long a stopped (cancelled / timed-out) execution gets to wind down.
_STOP_GRACE_S = 5.0


@dataclass
class Execution:
    """One job attempt held by this worker."""

    msg: Msg
    record: JobRecord
    revision: int
    ctx: ExecutionContext | None = None
    run_task: asyncio.Task[JobOutput] | None = None
    model: Any = None
    #: The record as last written, encoded (the reply to ``jobs.run`` reuses it).
    encoded: bytes | None = None
    cancel_requested: bool = False
    #: The dispatch generation of the message being run (see ``JobRecord.dispatch``).
    generation: int = 0
    stream: "_ChunkStream | None" = None
    streaming_write: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The claim is applied to ``record`` but not written yet (a deferred claim): the next
    #: write creates the record with it, and a conflict re-applies it to what is stored.
    unwritten: bool = False
    #: The arguments of this attempt's :func:`mnemos.lifecycle.claim` (for re-applying it).
    claim_args: dict[str, Any] = field(default_factory=dict)
    #: The run has ended (its result is being recorded): a deferred claim goes with it.
    ran: bool = False

    @property
    def job_id(self) -> str:
        return self.record.job_id


class _ChunkStream:
    """Publishes an execution's chunks to ``mnemos.results.<job_id>`` in order, never blocking
    the runtime: ``emit`` only queues and one task sends.

    Text that arrives within ``interval_s`` of the last chunk sent is merged into the next
    chunk (sent when the interval is up): the first token always goes out at once, a slow
    model streams token by token, and a fast one does not spend its CPU on a message per
    token. Chunks with ``data`` (items of a Python generator) are never merged.

    Chunks go out without an ack request; they are still stored in order: the stream takes
    one connection's messages in order and discards old messages rather than refuse new
    ones. The attempt's final message follows them the same way (see ``_announce``).
    """

    def __init__(self, nc: NATS, subject: str, job_id: str, attempt: int, interval_s: float) -> None:
        self._nc = nc
        self._subject = subject
        self._job_id = job_id
        self._attempt = attempt
        self._interval = interval_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[ResultChunk | None] = asyncio.Queue()
        self._seq = 0
        self._pending_text: list[str] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._last_sent = -1e9
        self._task = asyncio.create_task(self._pump(), name=f"chunks-{job_id}")

    def emit(self, text: str, data: Any) -> None:
        if data is not None:
            self._flush()
            self._put(text, data)
            return
        self._pending_text.append(text)
        if self._flush_at is None:
            wait = self._last_sent + self._interval - self._loop.time()
            if wait <= 0:
                self._flush()
            else:
                self._flush_at = self._loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._pending_text:
            text, self._pending_text = "".join(self._pending_text), []
            self._put(text, None)

    def _put(self, text: str, data: Any) -> None:
        self._queue.put_nowait(
            ResultChunk(job_id=self._job_id, attempt=self._attempt, seq=self._seq, text=text, data=data)
        )
        self._seq += 1
        self._last_sent = self._loop.time()

    async def _pump(self) -> None:
        while (chunk := await self._queue.get()) is not None:
            await self._nc.publish(self._subject, encode(chunk))

    async def close(self) -> None:
        """Send what is queued; the final message (acked) follows."""
        self._flush()
        self._queue.put_nowait(None)
        await self._task


class Executor:
    """Runs jobs for one worker and counts what happened."""

    def __init__(
        self,
        nc: NATS,
        names: Names,
        jobs: JobStore,
        pool: ModelPool,
        worker_id: str,
        *,
        on_finished: Callable[[JobRecord], None] | None = None,
        stream_interval_s: float = 0.0,
        metrics: WorkerMetrics | None = None,
        supervisor: Supervisor | None = None,
        claim_delay_s: float = 0.0,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.names = names
        self.jobs = jobs
        self.pool = pool
        self.worker_id = worker_id
        self.on_finished = on_finished
        self.stream_interval_s = stream_interval_s
        self.metrics = metrics
        self.running: dict[str, Execution] = {}
        #: Runs the executor's one-shot tasks (engine stops, doorbell rings): a failure is
        #: logged with the task's name; none is fatal to the worker.
        self.supervisor = supervisor if supervisor is not None else Supervisor(f"executor-{worker_id}")
        self.completed = 0
        self.failed = 0
        self.duplicates = 0
        #: Deferred claims are written once a run has lasted this long (0: never deferred).
        self.claim_delay_s = claim_delay_s
        self._deferred: collections.deque[tuple[float, Execution]] = collections.deque()
        self._deferred_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ entry points

    async def handle(self, msg: Msg) -> None:
        """Run one dispatch message to the end. Never raises (errors are recorded or logged)."""
        try:
            dispatch = decode(msg.data, Dispatch)
        except ValidationFailed as e:
            log.error("terminating malformed dispatch message %s: %s", msg.subject, e)
            await msg.term()
            return
        job_id = dispatch.record.job_id
        held = self.running.get(job_id)
        if held is not None:
            if dispatch.record.dispatch == held.generation:
                # Redelivered to us while we still run it: the newer delivery is the one to ack.
                held.msg = msg
            else:
                # Queued again (we were presumed dead): not ours to absorb; let it come back
                # once this stale execution is gone, here or elsewhere.
                await msg.nak(delay=0.2)
                self.ring_when_ready(msg.subject, 0.2)
            return
        ex = Execution(msg=msg, record=dispatch.record, revision=dispatch.revision,
                       generation=dispatch.record.dispatch)
        self.running[job_id] = ex
        try:
            await self._execute(ex)
        except Exception:
            log.exception("job %s: unexpected executor failure; leaving it for redelivery", job_id)
        finally:
            self.running.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        """Stop the execution of ``job_id`` if it runs here (a ``mnemos.cancel.<id>`` signal)."""
        ex = self.running.get(job_id)
        if ex is None or ex.cancel_requested:
            return ex is not None
        ex.cancel_requested = True
        if ex.ctx is not None:
            ex.ctx.cancel()
        if ex.run_task is not None:
            self.supervisor.spawn_oneshot(f"stop-engine-{job_id}", self._stop_engine(ex))
        return True

    async def touch_all(self) -> None:
        """Tell JetStream every running job is in progress (resets its ack wait)."""
        for ex in list(self.running.values()):
            try:
                await ex.msg.in_progress()
            except Exception as e:
                log.warning("in_progress for %s failed: %r", ex.job_id, e)

    # ------------------------------------------------------------------ the job

    async def _execute(self, ex: Execution) -> None:
        spec = ex.record.spec
        key = pool_key(ex.record.runtime, spec.model.family, spec.model.version, spec.model.runtime_config)
        warm = self.pool.is_loaded(key)
        if not await self._claim(ex, warm):
            return
        if not ex.unwritten:
            await self._publish_status(ex, ex.record.status)
        attempt = ex.record.attempt
        ctx = ExecutionContext(job_id=ex.job_id, attempt=attempt, spec=spec)
        ex.ctx = ctx
        if ex.cancel_requested:
            ctx.cancel()
        output: JobOutput | None = None
        error: MnemosError | None = None
        status = "completed"
        load_ms: float | None = None
        cache_hit: bool | None = None
        disk_hit: bool | None = None
        run_ms: float | None = None
        try:
            async with self.pool.use(key) as (model, info):
                cache_hit, load_ms, disk_hit = info.hit, info.load_ms, info.disk_hit
                if ex.record.status == "loading_model":  # also when another job did the loading
                    await self._write(ex, lambda r: self._phase(r, "running"))
                    await self._publish_status(ex, "running")
                if ex.record.status == "cancelling":
                    ctx.cancel()
                ctx.sink = self._sink(ex)
                ctx.started = time.perf_counter()
                try:
                    output = await self._run(ex, model, ctx)
                finally:
                    run_ms = (time.perf_counter() - ctx.started) * 1000.0
                    ex.ran = True
        except JobCancelled as e:
            status, error = "cancelled", e
        except JobTimeout as e:
            status, error = "timeout", e
        except MnemosError as e:
            status, error = "failed", e
        except Exception as e:
            status, error = "failed", ExecutionError(f"{type(e).__name__}: {e}")
        if ex.stream is not None:
            await ex.stream.close()
        if ex.streaming_write is not None:
            await ex.streaming_write
        if ctx.load_ms is not None:  # the runtime loaded during the run (an app process restarted)
            load_ms = (load_ms or 0.0) + ctx.load_ms
            cache_hit = False
        timings = Timings(
            queue_ms=ex.record.timings.queue_ms,
            load_ms=round(load_ms, 3) if load_ms is not None else None,
            first_token_ms=round(ctx.first_token_ms, 3) if ctx.first_token_ms is not None else None,
            run_ms=round(run_ms, 3) if run_ms is not None else None,
            cache_hit=cache_hit,
            disk_cache_hit=disk_hit,
        )
        if output is not None:
            output.metrics.setdefault("run_ms", timings.run_ms or 0.0)
            if timings.first_token_ms is not None:
                output.metrics.setdefault("first_token_ms", timings.first_token_ms)
        if self.metrics is not None:
            self.metrics.attempt_ended(ex.record.runtime, status, timings, output)
        await self._conclude(ex, status, output, error.info() if error else None, timings)

    async def _run(self, ex: Execution, model: Any, ctx: ExecutionContext) -> JobOutput:
        """Run until done, cancelled or timed out; stop the engine's request on the latter two."""
        if ctx.cancelled.is_set():
            raise JobCancelled(self._cancel_reason(ex))
        run = asyncio.create_task(model.run(ctx), name=f"run-{ex.job_id}")
        ex.run_task, ex.model = run, model
        try:
            async with asyncio.timeout(ex.record.spec.timeout_seconds):
                output: JobOutput = await asyncio.shield(run)
        except TimeoutError:
            await self._stop_engine(ex)
            raise JobTimeout(f"job exceeded its timeout of {ex.record.spec.timeout_seconds:g}s") from None
        except asyncio.CancelledError:
            if not ex.cancel_requested:  # this task itself is cancelled (drain): stop the run too
                run.cancel()
                raise
            raise JobCancelled(self._cancel_reason(ex)) from None
        if ex.cancel_requested:  # it stopped on the cancel signal and returned what it had
            raise JobCancelled(self._cancel_reason(ex), details={"partial_output": output.result})
        return output

    @staticmethod
    def _cancel_reason(ex: Execution) -> str:
        return (ex.record.error.message if ex.record.error else None) or "cancelled by request"

    async def _stop_engine(self, ex: Execution) -> None:
        """Stop one execution: the engine's request first (vLLM ``abort``), then its task."""
        ctx, run, model = ex.ctx, ex.run_task, ex.model
        if ctx is None or run is None or model is None:
            return
        ctx.cancel()
        try:
            await asyncio.wait_for(model.abort(ctx), timeout=_STOP_GRACE_S)
        except Exception as e:
            log.warning("job %s: abort failed: %r", ex.job_id, e)
        if model.stop_by_cancelling_task:
            run.cancel()
        done, _ = await asyncio.wait({run}, timeout=_STOP_GRACE_S)
        if not done:
            run.cancel()
            await asyncio.wait({run}, timeout=_STOP_GRACE_S)
        if run.done() and not run.cancelled():
            run.exception()  # retrieved: the stop reason is what counts

    def _sink(self, ex: Execution) -> Callable[[str, Any], None]:
        def sink(text: str, data: Any) -> None:
            if ex.stream is None:
                interval = self.stream_interval_s if getattr(ex.model, "merge_stream", False) else 0.0
                ex.stream = _ChunkStream(self.nc, self.names.results_subject(ex.job_id), ex.job_id,
                                         ex.record.attempt, interval)
                ex.streaming_write = asyncio.create_task(self._mark_streaming(ex))
            ex.stream.emit(text, data)

        return sink

    async def _mark_streaming(self, ex: Execution) -> None:
        try:
            await self._write(ex, lambda r: self._phase(r, "streaming"))
        except MnemosError as e:
            log.warning("job %s: could not record streaming: %r", ex.job_id, e)

    # ------------------------------------------------------------------ record writes

    def _phase(self, rec: JobRecord, phase: str) -> JobRecord | None:
        return rec if lifecycle.enter_phase(rec, self.worker_id, phase, utcnow()) else None

    async def _write(self, ex: Execution, change: Callable[[JobRecord], JobRecord | None]) -> bool:
        """Compare-and-set ``change`` onto the record; on conflict re-read and re-apply.

        Returns False (and leaves the current record in ``ex``) when ``change`` declines.
        ``change`` (a :mod:`mnemos.lifecycle` transition) edits the record in place, so it
        gets a copy: a write that fails leaves ``ex.record`` as it was read.
        """
        async with ex.lock:
            rec = ex.record
            for tries in range(20):
                new = change(decode(ex.encoded if rec is ex.record and ex.encoded else encode(rec), JobRecord))
                if new is None:
                    if rec is not ex.record:  # re-read: the encoded copy is of the old one
                        ex.record, ex.encoded = rec, None
                    return False
                new.updated_at = utcnow()
                data = encode(new)
                try:
                    ex.revision = await self.jobs.update(new, ex.revision, data)
                    ex.record, ex.encoded = new, data
                    ex.unwritten = False
                    return True
                except Conflict:
                    pass
                try:
                    rec, ex.revision = await self.jobs.get(ex.job_id, fresh=True)
                    if ex.unwritten and not self._reclaim(ex, rec):
                        # Written by someone else meanwhile (the control plane's deferred
                        # record, a cancel): this attempt's claim does not apply to it.
                        ex.record, ex.encoded, ex.unwritten = rec, None, False
                        return False
                except JobNotFound:
                    if ex.revision != 0:
                        raise  # it was written once and is gone now
                    # Creating it lost to the control plane's create, still in flight in a
                    # clustered stream (not stored on the leader yet): try again shortly.
                    rec = ex.record
                    await asyncio.sleep(0.02 * (tries + 1))
            raise Conflict(f"job {ex.job_id} kept changing under worker {self.worker_id}")

    async def _claim(self, ex: Execution, warm: bool) -> bool:
        """Take the job for a new attempt; False if it is not ours to run (then acked)."""
        generation = ex.generation
        try:
            meta = ex.msg.metadata
            dispatch_seq: int | None = meta.sequence.stream
            redelivered = meta.num_delivered > 1
        except Exception:  # noqa: BLE001 - not a JetStream message (never in practice)
            dispatch_seq, redelivered = None, True
        outcome = lifecycle.Claim.STALE
        ex.claim_args = {"generation": generation, "redelivered": redelivered, "warm": warm,
                         "dispatch_seq": dispatch_seq}
        rec = ex.record
        # The control plane writes this job's queued record right after its message
        # (``jobs.submit``, a key, ``jobs.start``), or only if nobody claims it (``jobs.run``).
        record_follows = (rec.reply_to is None or rec.spec.idempotency_key is not None
                          or bool(ex.msg.headers and ex.msg.headers.get(HDR_RECORD_FOLLOWS)))
        if (warm and ex.revision == 0 and not redelivered and self.claim_delay_s > 0
                and not record_follows):
            # A ``jobs.run`` job without an idempotency key: its caller learns its id only
            # from the answer, and the control plane writes its queued record only if no
            # worker claimed it within ``run_record_delay_s`` (1 s), so nobody can address it
            # yet. Run first; write the claim with the result, or when the run outlives the
            # delay. A worker that dies within it leaves no attempt on record; the message
            # comes back (to this or another worker) after its ack wait.
            if self._reclaim(ex, ex.record):
                ex.unwritten = True
                self._defer(ex)
                return True

        def claim(rec: JobRecord) -> JobRecord | None:
            nonlocal outcome
            outcome = lifecycle.claim(rec, self.worker_id, utcnow(), **ex.claim_args)
            return rec if outcome in (lifecycle.Claim.TAKEN, lifecycle.Claim.ENDED) else None

        if ex.revision == 0 and record_follows:
            # By now the record is almost always there. Read it first, so the claim names
            # its revision instead of losing a create to it (a lost create costs a write, a
            # read and a second write).
            try:
                ex.record, ex.revision = await self.jobs.get(ex.job_id, fresh=True)
                ex.encoded = None
            except JobNotFound:
                pass  # not written yet: the claim creates it (a create that loses re-reads)
        try:
            await self._write(ex, claim)
        except JobNotFound:
            # The record is gone (past its retention, or deleted) while its message lived on:
            # nothing can run or record this job. Terminated, so it is not redelivered forever.
            log.error("job %s: its record no longer exists; terminating its dispatch message", ex.job_id)
            await ex.msg.term()
            return False
        if outcome is lifecycle.Claim.TAKEN:
            log.debug("job %s attempt %d claimed (%s)", ex.job_id, ex.record.attempt, ex.record.status)
            return True
        log.debug("job %s: %s on arrival (%s); dropping this message", ex.job_id, outcome.value, ex.record.status)
        if outcome is lifecycle.Claim.ENDED:
            if self.metrics is not None:
                self.metrics.job_finished(ex.record.status, ex.record.runtime)
            await self._announce(ex)
        elif outcome is lifecycle.Claim.FINISHED:
            await self._ensure_announced(ex)
        await ex.msg.ack()
        return False

    def _reclaim(self, ex: Execution, rec: JobRecord) -> bool:
        """Apply this attempt's claim to ``rec`` (in place); whether it was taken."""
        return lifecycle.claim(rec, self.worker_id, utcnow(), **ex.claim_args) is lifecycle.Claim.TAKEN

    def _defer(self, ex: Execution) -> None:
        """Write ``ex``'s claim in ``claim_delay_s`` unless its result is written first. One
        timer serves every deferred claim (they fall due in the order they were made)."""
        loop = asyncio.get_running_loop()
        self._deferred.append((loop.time() + self.claim_delay_s, ex))
        if self._deferred_timer is None:
            self._deferred_timer = loop.call_at(self._deferred[0][0], self._claims_due)

    def _claims_due(self) -> None:
        self._deferred_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deferred and self._deferred[0][0] <= now:
            _, ex = self._deferred.popleft()
            if ex.unwritten and not ex.ran and self.running.get(ex.job_id) is ex:
                self.supervisor.spawn_oneshot(f"claim-{ex.job_id}", self._write_deferred_claim(ex))
        if self._deferred:
            self._deferred_timer = loop.call_at(self._deferred[0][0], self._claims_due)

    async def _write_deferred_claim(self, ex: Execution) -> None:
        """The run outlived the claim delay: record the claim (and say so on the result
        stream). If the job turns out not to be this attempt's (cancelled, or queued again
        meanwhile), the run is stopped and its result dropped."""
        skipped = False

        def keep(rec: JobRecord) -> JobRecord | None:
            nonlocal skipped
            if ex.unwritten:
                return rec
            skipped = True  # the result's write came first: nothing to do
            return None

        if await self._write(ex, keep):
            await self._publish_status(ex, ex.record.status)
        elif not skipped:
            log.info("job %s: %s before its claim was written; stopping the run", ex.job_id, ex.record.status)
            self.cancel(ex.job_id)

    async def _conclude(
        self,
        ex: Execution,
        status: str,
        output: JobOutput | None,
        error: ErrorInfo | None,
        timings: Timings,
    ) -> None:
        attempt = ex.record.attempt
        retry_after = lifecycle.retry_in(ex.record, status, error)
        final: str | None = None

        def finish(rec: JobRecord) -> JobRecord | None:
            nonlocal final
            final = lifecycle.finish(rec, self.worker_id, attempt, utcnow(), outcome=status, output=output,
                                     error=error, timings=timings, retry_after=retry_after)
            return rec if final is not None else None

        await self._write(ex, finish)
        if final is None:
            self.duplicates += 1
            log.warning(
                "job %s: attempt %d finished here but the record moved on (%s by %s); result dropped",
                ex.job_id, attempt, ex.record.status, ex.record.worker_id,
            )
            if ex.record.terminal or ex.record.dispatch != ex.generation:
                await ex.msg.ack()  # nothing left to do with this message
            return
        record = ex.record
        retrying = final == "retrying"
        log.info(
            "job %s %s (attempt %d, run %.1f ms%s)",
            record.job_id, record.status, attempt, timings.run_ms or 0.0,
            f", retry in {retry_after:.2f}s" if retrying and retry_after is not None else "",
        )
        await self._announce(ex)
        if retrying and retry_after is not None:
            await ex.msg.nak(delay=retry_after)
            self.ring_when_ready(ex.msg.subject, retry_after)
            return
        if record.status == "completed":
            self.completed += 1
        else:
            self.failed += 1
        if self.metrics is not None:
            self.metrics.job_finished(record.status, record.runtime)
        await ex.msg.ack()
        if self.on_finished is not None:
            self.on_finished(record)

    def ring_when_ready(self, dispatch_subject: str, delay: float) -> None:
        """A nak'ed job (of ``dispatch_subject``) comes back without a publish; ring idle
        workers' doorbells for its level then."""
        try:
            runtime, priority, model = Names.parse_dispatch_subject(dispatch_subject)
        except (IndexError, ValueError):
            log.warning("not ringing for a message on %s (not a dispatch subject)", dispatch_subject)
            return
        subject = self.names.ready_subject(runtime, priority, model)

        def ring() -> None:
            self.supervisor.spawn_oneshot(f"ring-{runtime}-{priority}", self.nc.publish(subject, b""))

        asyncio.get_running_loop().call_later(delay + 0.005, ring)

    async def _ensure_announced(self, ex: Execution) -> None:
        """A finished job's message came back: its worker may have died between recording
        the result and announcing it. Announce it unless the result stream already ends so."""
        record = ex.record
        try:
            last = await self.js.get_last_msg(self.names.results_stream, self.names.results_subject(record.job_id),
                                              direct=True)
            item = decode_result(last.data or b"")
            if isinstance(item, ResultFinal) and item.status == record.status and item.attempt == record.attempt:
                return
        except Exception as e:  # not found (never announced), or unreadable: announce
            log.debug("job %s: no final result message yet (%r)", record.job_id, e)
        log.info("job %s: announcing the %s result its worker recorded but did not announce",
                 record.job_id, record.status)
        await self._announce(ex)

    async def _publish_status(self, ex: Execution, status: str) -> None:
        """Put a status change on the result stream (no ack: the record is the authority)."""
        status_msg = ResultStatus(job_id=ex.job_id, attempt=ex.record.attempt, status=status,  # type: ignore[arg-type]
                                  at=utcnow(), worker_id=self.worker_id)
        try:
            await self.nc.publish(self.names.results_subject(ex.job_id), encode(status_msg))
        except Exception as e:  # noqa: BLE001 - a lost status event must not fail the job
            log.warning("job %s: status %s not published: %r", ex.job_id, status, e)

    async def _announce(self, ex: Execution) -> None:
        """Answer a waiting ``jobs.run`` and write the attempt's final result message.

        The final message goes out without an ack request, like the chunks before it (the
        server stores one connection's messages in order). It is a notification: the
        record, written before it with compare-and-set, is the authority, and every reader
        (``Client.wait``, ``Client.events``, the gateway) falls back to the record when the
        final message is missing, so waiting for its ack would cost a round trip and an ack
        message per job and protect nothing."""
        record = ex.record
        if record.reply_to and record.terminal:
            await self.nc.publish(record.reply_to, ex.encoded or encode(record))
        await self.nc.publish(self.names.results_subject(record.job_id), encode(ResultFinal.of(record)))

    async def hand_back(self, ex: Execution) -> None:
        """Give a job back to the queue at once (drain timeout): not a failed attempt."""
        attempt = ex.record.attempt

        def release(rec: JobRecord) -> JobRecord | None:
            return rec if lifecycle.hand_back(rec, self.worker_id, attempt, utcnow()) else None

        try:
            await self._write(ex, release)
        finally:
            await ex.msg.nak()
