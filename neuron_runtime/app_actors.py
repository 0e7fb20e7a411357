"""Actors inside the app process: calls straight from NATS, state checkpointed to KV.

They run on an event loop of their own, in a thread of the app process: a method runs
inline on it (a sync method too: a thread hop per call would cost more than the call), so
a slow method holds up the process's other actors, but never its functions, its batches
or the worker's cancels. Make a slow method ``async``, or a function.

The worker claims an actor's activation (a KV create, see :mod:`neuron_runtime.actors`)
and hands it here (an ``Activate`` frame). From then on this process alone serves it:

- it subscribes to the actor's subject with its own NATS connection and answers each
  call (core request/reply: no JetStream on the call's path); a subscription delivers
  its messages one at a time, so calls run one at a time, in arrival order;
- after each call the state (``vars(self)`` or ``__getstate__()``, JSON) is encoded, and a
  writer checkpoints the latest to ``state.<token>`` with a compare-and-set on the
  revision it wrote last (after the reply: calls that come while a write is in flight are
  covered by the next write; ``checkpoint_interval`` spaces writes out). A write that loses
  means another activation took the actor over: this one stops at once (fenced);
- after ``idle_timeout`` without a call it deactivates: calls that arrive meanwhile are
  told to retry, the last state is written, the activation is removed, and only then does
  it stop answering (the next call activates it again, from that state).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mnemos.app import Actor
from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.errors import ErrorInfo, MnemosError, UnknownFunction, ValidationFailed
from mnemos.messages import ActorCall, ActorReply, ActorState, encode, utcnow
from mnemos.names import HDR_PING
from mnemos.tasks import next_round
from neuron_runtime.app_protocol import Activate, Deactivated

__all__ = ["ActorHost"]

log = logging.getLogger("mnemos.app.actors")

_json = msgspec.json.Encoder()
_calls = msgspec.json.Decoder(ActorCall)


def _state_of(instance: Any) -> Any:
    getstate = getattr(type(instance), "__getstate__", None)
    if getstate is not None and getstate is not object.__getstate__:
        return instance.__getstate__()
    return vars(instance)


def _restore(cls: type[Any], state: Any) -> Any:
    instance: Any = object.__new__(cls)
    setstate = getattr(cls, "__setstate__", None)
    if setstate is not None and setstate is not getattr(object, "__setstate__", None):
        instance.__setstate__(state)
    elif isinstance(state, dict):
        instance.__dict__.update(state)
    else:
        raise ValidationFailed(f"{cls.__name__}: a checkpoint that is not a dict needs __setstate__")
    return instance


class _Activation:
    """One actor hosted here."""

    def __init__(self, host: "ActorHost", frame: Activate, actor: Actor, instance: Any) -> None:
        self.host = host
        self.frame = frame
        self.actor = actor
        self.instance = instance
        self.methods = {m.name for m in actor.definition.methods}
        self.state_revision = frame.state_revision
        self.calls = frame.calls
        self.last_call = time.monotonic()
        self.encoded: bytes = _json.encode(_state_of(instance))
        self.dirty = asyncio.Event()
        self.closing = False
        #: A call is running (an actor is never idle while one does).
        self.busy = False
        self.sub: Any = None
        self.tasks: list[asyncio.Task[None]] = []

    async def on_call(self, msg: Msg) -> None:
        if msg.headers and HDR_PING in msg.headers:
            await msg.respond(b"")
            return
        if self.closing:
            await msg.respond(encode(ActorReply(retry=True)))
            return
        self.busy = True
        try:
            call = _calls.decode(msg.data)
            if call.method not in self.methods:
                raise UnknownFunction(f"actor {self.actor.definition.name} has no method {call.method!r}; it has "
                                      f"{', '.join(sorted(self.methods))}")
            result = getattr(self.instance, call.method)(*call.args, **call.kwargs)
            if inspect.isawaitable(result):
                result = await result
            reply = _json.encode(ActorReply(result=result))
        except MnemosError as e:
            reply = encode(ActorReply(error=e.info()))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            reply = encode(ActorReply(error=ValidationFailed(f"bad actor call: {e}").info()))
        except Exception as e:  # noqa: BLE001 - the method's own error, to its caller
            reply = encode(ActorReply(error=ErrorInfo(
                code="execution_error", message=f"{type(e).__name__}: {e}", retryable=False,
                details={"exception_type": type(e).__name__, "traceback": "".join(traceback.format_exception(e))})))
        finally:
            self.busy = False
            self.last_call = time.monotonic()  # idle counts from the end of the last call
        self.calls += 1
        try:
            self.encoded = _json.encode(_state_of(self.instance))
        except (TypeError, msgspec.EncodeError) as e:
            log.error("actor %s(%r): state is not JSON-encodable (%s); not checkpointed",
                      self.actor.definition.name, self.frame.key, e)
        self.dirty.set()
        try:
            await msg.respond(reply)
        except nats.errors.MaxPayloadError:
            too_big = ValidationFailed(f"a result of {self.frame.cls} is {len(reply)} bytes, over the server's "
                                       "max_payload")
            await msg.respond(encode(ActorReply(error=too_big.info())))

    async def write(self) -> bool:
        """Checkpoint the latest state; False: fenced (another activation wrote since)."""
        record = ActorState(app=self.host.app_name, cls=self.frame.cls, key=self.frame.key,
                            state=msgspec.Raw(self.encoded), saved_at=utcnow(), calls=self.calls,
                            last_call_at=utcnow())
        try:
            self.state_revision = await self.host.kv.update(self.frame.state_key, encode(record),
                                                            last=self.state_revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def checkpoints(self) -> None:
        interval = self.actor.definition.checkpoint_interval
        while True:
            await self.dirty.wait()
            if interval:
                await next_round(interval)
            self.dirty.clear()
            try:
                written = await self.write()
            except Exception as e:  # noqa: BLE001 - NATS away for a moment: the next write covers it
                log.warning("actor %s(%r): checkpoint failed (%r); retrying", self.frame.cls, self.frame.key, e)
                self.dirty.set()
                await asyncio.sleep(0.5)
                continue
            if not written:
                log.warning("actor %s(%r) was taken over elsewhere; stopping here", self.frame.cls, self.frame.key)
                self.host.spawn(self.host.deactivate(self, "taken over elsewhere", fenced=True))
                return

    async def idle(self) -> None:
        timeout = self.actor.definition.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if not self.busy and time.monotonic() - self.last_call >= timeout:
                self.host.spawn(self.host.deactivate(self, f"idle for {timeout:g}s"))
                return


class ActorHost:
    """The actors of one app process."""

    def __init__(self, app_name: str, members: dict[str, Any], send: Callable[[Any], None]) -> None:
        self.app_name = app_name
        self.members = members
        #: Sends a frame to the worker (thread-safe: the child's loop writes it).
        self.send = send
        self.active: dict[str, _Activation] = {}
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None
        return self._kv

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        """Run ``coro``; its failure is logged, never silent."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("actor task failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _connect(self) -> None:
        async with self._lock:
            if self._nc is None:
                settings = NatsSettings()
                self._nc = await connect(settings, f"mnemos-app-{self.app_name}-{os.getpid()}")
                self._kv = await self._nc.jetstream().key_value(settings.names.actors_bucket)

    async def activate(self, frame: Activate) -> int:
        """Start hosting; the pid answering its calls."""
        actor = self.members.get(frame.cls)
        if not isinstance(actor, Actor) or actor.raw is None:
            raise UnknownFunction(f"app {self.app_name} has no actor {frame.cls!r}")
        await self._connect()
        assert self._nc is not None
        if frame.has_state:
            instance = _restore(actor.raw, frame.state)
        else:
            instance = await asyncio.get_running_loop().run_in_executor(None, actor.raw)
        try:
            activation = _Activation(self, frame, actor, instance)
        except (TypeError, msgspec.EncodeError) as e:
            raise ValidationFailed(f"actor {frame.cls}: its state must be JSON (or define __getstate__/"
                                   f"__setstate__): {e}") from e
        # The first write fences any earlier activation still writing (a partitioned host).
        if not await activation.write():
            raise MnemosError(f"actor {frame.cls}({frame.key!r}) was checkpointed concurrently", retryable=True)
        # A queue group: should a holder that was taken over come back (a partition healed),
        # each call still runs once, until that holder's next write fences it.
        activation.sub = await self._nc.subscribe(frame.subject, queue=frame.token, cb=activation.on_call)
        await self._nc.flush()
        self.active[frame.token] = activation
        activation.tasks = [self.spawn(activation.checkpoints()), self.spawn(activation.idle())]
        log.info("actor %s(%r) active (%d calls so far)", frame.cls, frame.key, frame.calls)
        return os.getpid()

    async def deactivate(self, activation: _Activation, reason: str, *, fenced: bool = False) -> None:
        """Step down: stop answering (the call running finishes, calls queued are told to
        retry), write the last state, remove the activation, tell the worker. Whatever
        fails on the way, the actor is let go of (the next claimant takes it over)."""
        if self.active.get(activation.frame.token) is not activation:
            return
        activation.closing = True  # calls from now on are told to retry
        for task in activation.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        try:
            try:
                await asyncio.wait_for(activation.sub.drain(), 30.0)
            except Exception as e:  # noqa: BLE001 - the connection is going away: nothing to drain
                log.debug("drain of %s: %r", activation.frame.subject, e)
            if not fenced and await self._last_write(activation):
                try:
                    await self.kv.delete(activation.frame.activation_key, last=activation.frame.activation_revision)
                except Exception as e:  # noqa: BLE001 - taken over meanwhile: not ours to remove
                    log.info("actor %s(%r): activation not removed: %r", activation.frame.cls,
                             activation.frame.key, e)
        finally:
            self.active.pop(activation.frame.token, None)
            log.info("actor %s(%r) deactivated: %s", activation.frame.cls, activation.frame.key, reason)
            self.send(Deactivated(token=activation.frame.token, reason=reason))

    @staticmethod
    async def _last_write(activation: _Activation) -> bool:
        """The final checkpoint, tried a few times (NATS may be away for a moment)."""
        for attempt in range(5):
            try:
                return await activation.write()
            except Exception as e:  # noqa: BLE001 - retried, then given up (its last write stands)
                log.warning("actor %s(%r): last checkpoint failed (%r)", activation.frame.cls, activation.frame.key, e)
                await asyncio.sleep(0.2 * 2**attempt)
        return False

    async def shutdown(self, reason: str) -> None:
        """Deactivate every actor at once (the worker went away or stops this process)."""
        async def one(activation: _Activation) -> None:
            try:
                await asyncio.wait_for(self.deactivate(activation, reason), 4.0)
            except Exception as e:  # noqa: BLE001 - the next claimant takes it over
                log.warning("actor %s(%r) not deactivated cleanly: %r", activation.frame.cls, activation.frame.key, e)

        await asyncio.gather(*(one(a) for a in list(self.active.values())))
        if self._nc is not None:
            await self._nc.close()
