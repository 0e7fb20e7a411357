"""What every route needs: the gateway's state and a client acting for the caller's tenant."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from control_plane.gateway.auth import ApiKeys
from control_plane.gateway.config import GatewaySettings
from control_plane.gateway.metrics import GatewayMetrics
from mnemos.client import Client
from mnemos.errors import NotConnected

__all__ = ["GatewayState", "gateway_state", "tenant_client"]

log = logging.getLogger("mnemos.gateway")

_bearer = HTTPBearer(auto_error=False, description="An API key (when the gateway has keys configured)")


@dataclass
class GatewayState:
    settings: GatewaySettings
    keys: ApiKeys
    metrics: GatewayMetrics
    #: Set by the app's lifespan (or given by the caller, e.g. tests).
    client: Client | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` after the response (e.g. cancel the job of a client that left); its
        failure is logged, and :meth:`drain` waits for it at shutdown."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("gateway background task failed: %r", t.exception())

        task.add_done_callback(done)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def tenant_client(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Client:
    """The NATS client acting for the tenant of the request's API key (401 without one)."""
    state = gateway_state(request)
    tenant = state.keys.tenant(credentials.credentials if credentials is not None else None)
    if state.client is None:
        raise NotConnected("the gateway is not connected to NATS")
    return state.client.for_tenant(tenant)
