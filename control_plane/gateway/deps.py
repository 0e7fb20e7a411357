"""What every route needs: the gateway's state and a client acting for the caller's tenant."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from control_plane.gateway.auth import ApiKeys
from control_plane.gateway.config import GatewaySettings
from control_plane.gateway.metrics import GatewayMetrics
from mnemos.client import Client
from mnemos.errors import Forbidden, NotConnected
from mnemos.tasks import Supervisor

__all__ = ["GatewayState", "gateway_state", "state_of", "tenant_client", "operator_client"]


_bearer = HTTPBearer(auto_error=False, description="An API key (when the gateway has keys configured)")


@dataclass
class GatewayState:
    settings: GatewaySettings
    keys: ApiKeys
    metrics: GatewayMetrics
    #: Set by the app's lifespan (or given by the caller, e.g. tests).
    client: Client | None = None
    #: Every background task of this gateway. ``mnemos gateway`` exits non-zero when a
    #: supervised loop dies (it waits on ``supervisor.failed``).
    supervisor: Supervisor = field(default_factory=lambda: Supervisor("gateway"))

    def background(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` after the response (e.g. cancel the job of a client that left) as
        one-shot task ``name``: its failure is logged with the name, and :meth:`drain`
        waits for it at shutdown."""
        self.supervisor.spawn_oneshot(name, coro)

    async def drain(self, timeout: float = 5.0) -> None:
        """Let background tasks finish (bounded), then stop every task of the gateway."""
        await self.supervisor.settle(timeout)
        await self.supervisor.stop(timeout=timeout)


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def gateway_state(request: Request) -> GatewayState:
    """The gateway's state, as a route dependency. Every dependency here is ``async``:
    FastAPI runs a plain ``def`` one in its thread pool, a thread hop on every request."""
    return state_of(request)


async def tenant_client(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Client:
    """The NATS client acting for the tenant of the request's API key (401 without one)."""
    state = state_of(request)
    tenant = state.keys.tenant(credentials.credentials if credentials is not None else None)
    if state.client is None:
        raise NotConnected("the gateway is not connected to NATS")
    return state.client.for_tenant(tenant)


async def operator_client(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Client:
    """The NATS client acting as the operator (no tenant): for a key whose tenant is in
    ``MNEMOS_GATEWAY_OPERATOR_TENANTS``, or anyone on a gateway without keys (loopback).
    Another tenant's key gets 403 ``forbidden``; none, 401."""
    state = state_of(request)
    tenant = state.keys.tenant(credentials.credentials if credentials is not None else None)
    operators = {t.strip() for t in state.settings.operator_tenants.split(",") if t.strip()}
    if tenant is not None and tenant not in operators:
        raise Forbidden(f"tenant {tenant!r} is not an operator (MNEMOS_GATEWAY_OPERATOR_TENANTS)")
    if state.client is None:
        raise NotConnected("the gateway is not connected to NATS")
    return state.client
