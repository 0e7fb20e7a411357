"""Placing actors: a worker activates the actors callers ask for.

A call that finds nobody answering on its actor's subject asks ``<ns>.actors.activate``;
one worker (queue group) takes the request and:

1. claims the actor with a KV create of ``act.<token>`` (compare-and-set): of any number of
   workers asked at once, one wins; the others answer with the winner's record;
2. if the key exists and its holder does not answer on the actor's subject, the holder's
   worker is asked whether it hosts the actor or is still activating it: a worker that
   does not answer (it died) or no longer has it (its app process died) is replaced with
   a compare-and-set on the record's revision, so two claimants never both take it over;
3. hands the actor to the app process of the app's live version (started if needed) with
   its last checkpoint; that process answers its calls from then on.

The caller then calls again and reaches the process directly. Nothing here is on the
call's path.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from mnemos.catalog import ModelCatalog
from mnemos.errors import AppNotFound, Internal, MnemosError, ModelLoadError, UnknownFunction, ValidationFailed
from mnemos.layout import Layout
from mnemos.messages import (
    ActivateActor,
    ActorActivation,
    ActorState,
    AppRecord,
    decode,
    encode,
    error_envelope,
    utcnow,
)
from mnemos.names import HDR_PING, Names
from mnemos.runtime_config import PythonConfig, parse_runtime_config
from neuron_runtime.app_protocol import Activate
from neuron_runtime.runtimes.python import PythonRuntime

__all__ = ["ActorPlacement"]

log = logging.getLogger("mnemos.actors")

#: How long a holder may take to show it is there (a busy one answers later: still there).
_PING_S = 0.25
#: Activations this worker runs at once (each its own task: a slow one holds up no other).
_CONCURRENT_ACTIVATIONS = 64
#: The longest an activation may take (an app process start, the actor's ``__init__``).
ACTIVATE_TIMEOUT_S = 180.0


class ActorPlacement:
    """Takes activation requests for this worker."""

    def __init__(self, nc: NATS, names: Names, layout: Layout, runtime: PythonRuntime, catalog: ModelCatalog,
                 worker_id: str) -> None:
        self.nc = nc
        self.names = names
        self.layout = layout
        self.runtime = runtime
        self.catalog = catalog
        self.worker_id = worker_id
        self.activated = 0
        #: Tokens being activated here (claimed, not answering yet).
        self.activating: set[str] = set()
        self._gate = asyncio.Semaphore(_CONCURRENT_ACTIVATIONS)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> list[Subscription]:
        return [
            await self.nc.subscribe(self.names.actor_activate_subject, queue=self.names.actors_queue_group,
                                    cb=self._on_activate),
            await self.nc.subscribe(self.names.worker_actors_subject(self.worker_id), cb=self._on_holds),
        ]

    def holds(self, token: str) -> str:
        """``activating``, ``hosting`` or ``absent``: what this worker has of an actor."""
        if token in self.activating:
            return "activating"
        return "hosting" if self.runtime.hosts_actor(token) else "absent"

    async def _on_holds(self, msg: Msg) -> None:
        await msg.respond(self.holds(msg.data.decode(errors="replace")).encode())

    async def _on_activate(self, msg: Msg) -> None:
        """Each request in a task of its own (a subscription hands over one message at a time)."""
        task = asyncio.create_task(self._activate_and_answer(msg), name="actor-activate")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for activations in progress (their callers get an answer)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=ACTIVATE_TIMEOUT_S)

    async def _activate_and_answer(self, msg: Msg) -> None:
        try:
            async with self._gate:
                record = await self.activate(decode(msg.data, ActivateActor))
            await msg.respond(encode(record))
        except Exception as e:
            error = e if isinstance(e, MnemosError) else Internal(f"{type(e).__name__}: {e}")
            if not isinstance(e, MnemosError):
                log.exception("activating an actor failed")
            if msg.reply:
                body, headers = error_envelope(error)
                try:
                    await self.nc.publish(msg.reply, body, headers=headers)
                except Exception as publish_error:  # noqa: BLE001 - the caller's own timeout tells it
                    log.warning("could not answer an activation request: %r", publish_error)

    async def _answers(self, subject: str) -> bool:
        """Whether a process still serves ``subject`` (a busy one counts)."""
        try:
            await self.nc.request(subject, b"", timeout=_PING_S, headers={HDR_PING: "1"})
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.TimeoutError:
            return True
        return True

    async def _holder_has(self, holder: ActorActivation, token: str) -> bool:
        """Whether the holder's worker still hosts (or activates) the actor."""
        if holder.worker_id == self.worker_id:
            return self.holds(token) != "absent"
        try:
            reply = await self.nc.request(self.names.worker_actors_subject(holder.worker_id), token.encode(),
                                          timeout=2.0)
        except nats.errors.NoRespondersError:
            return False  # that worker is gone
        except nats.errors.TimeoutError:
            return True  # there, but slow: not ours to take
        return reply.data.decode() != "absent"

    async def activate(self, req: ActivateActor) -> ActorActivation:
        """The actor's activation: the one that answers, or a new one here."""
        kv = self.layout.actors
        try:
            app = decode((await self.layout.apps.get(req.app)).value or b"", AppRecord)
        except KeyNotFoundError:
            raise AppNotFound(f"no app {req.app!r} is deployed") from None
        definition = app.definition(req.cls)
        if definition is None or definition.kind != "actor":
            raise UnknownFunction(f"app {req.app} has no actor {req.cls!r}")
        token = Names.actor_token(req.app, req.cls, req.key)
        key = Names.actor_activation_key(token)
        record = ActorActivation(app=req.app, cls=req.cls, key=req.key, version=app.version,
                                 worker_id=self.worker_id, subject=self.names.actor_subject(token),
                                 activated_at=utcnow())
        try:
            revision = await kv.create(key, encode(record))
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # deactivated in between: the caller asks again
                raise MnemosError("the actor was deactivating; call again", retryable=True) from None
            holder = decode(entry.value or b"", ActorActivation)
            if await self._answers(holder.subject) or await self._holder_has(holder, token):
                return holder  # the caller calls again (an activation in progress answers soon)
            try:
                revision = await kv.update(key, encode(record), last=entry.revision or 0)
            except KeyWrongLastSequenceError:  # another worker took it over first
                return decode((await kv.get(key)).value or b"", ActorActivation)
            log.info("actor %s(%r): its holder %s no longer answers; taking it over", req.cls, req.key,
                     holder.worker_id)
        self.activating.add(token)
        try:
            await self._host(app, record, token, revision)
        except BaseException:
            try:
                await kv.delete(key, last=revision)
            except Exception as e:  # noqa: BLE001 - left for the next claimant to take over
                log.warning("could not release the activation of %s(%r): %r", req.cls, req.key, e)
            raise
        finally:
            self.activating.discard(token)
        self.activated += 1
        return record

    async def _host(self, app: AppRecord, record: ActorActivation, token: str, revision: int) -> None:
        model = await self.catalog.get(app.name, app.version)
        config = parse_runtime_config("python", model.runtime_config)
        if not isinstance(config, PythonConfig) or config.isolation != "process":
            raise ValidationFailed(f"{model.name} is not an app")
        state_key = Names.actor_state_key(token)
        try:
            entry = await self.layout.actors.get(state_key)
            state: ActorState | None = decode(entry.value or b"", ActorState)
            state_revision = entry.revision or 0
        except KeyNotFoundError:
            state, state_revision = None, 0
        host = await self.runtime.host_for(model, config)
        try:
            await asyncio.wait_for(host.activate(Activate(
                id=0, cls=record.cls, key=record.key, token=token, subject=record.subject,
                activation_key=Names.actor_activation_key(token), activation_revision=revision,
                state_key=state_key, state_revision=state_revision, has_state=state is not None,
                state=state.state if state is not None else None, calls=state.calls if state is not None else 0,
            )), ACTIVATE_TIMEOUT_S)
        except TimeoutError:
            raise ModelLoadError(f"activating {record.cls}({record.key!r}) took over {ACTIVATE_TIMEOUT_S:g}s",
                                 retryable=True) from None
        finally:
            await self.runtime.release(host)
