"""Live actors as the control plane shows them (``actors.list``, ``mnemos actors ls``,
``/v1/actors``): each activation of ``<ns>_actors`` with the calls and last call its last
checkpoint recorded. Read on request (a one-off scan of the bucket); actors themselves
never go through the control plane."""

from __future__ import annotations

from nats.js.kv import KeyValue

from mnemos.errors import ValidationFailed
from mnemos.kvscan import kv_values
from mnemos.messages import ActorActivation, ActorList, ActorState, ActorView, decode

__all__ = ["list_actors"]


async def list_actors(kv: KeyValue, app: str | None = None) -> ActorList:
    activations: dict[str, ActorActivation] = {}
    states: dict[str, ActorState] = {}
    async for key, value, _ in kv_values(kv):
        kind, _, token = key.partition(".")
        try:
            if kind == "act":
                activations[token] = decode(value, ActorActivation)
            elif kind == "state":
                states[token] = decode(value, ActorState)
        except ValidationFailed:
            continue  # written by another release: not shown rather than failing the list
    views = []
    for token, activation in activations.items():
        if app is not None and activation.app != app:
            continue
        state = states.get(token)
        views.append(ActorView(activation=activation, calls=state.calls if state else 0,
                               last_call_at=state.last_call_at if state else None))
    views.sort(key=lambda v: (v.activation.app, v.activation.cls, v.activation.key))
    return ActorList(actors=views)
