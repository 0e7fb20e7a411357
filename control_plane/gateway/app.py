"""The HTTP gateway app: the job API, the OpenAI-compatible API, health and metrics.

    app = create_app(GatewaySettings(), NatsSettings())   # connects to NATS in its lifespan

Stateless like every MNEMOS process: run as many gateways as needed behind a load
balancer; each one is a NATS client of the control plane.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.gateway import apps, jobs, openai_api, pools, tenants
from control_plane.gateway.auth import ApiKeys
from control_plane.gateway.config import GatewaySettings
from control_plane.gateway.deps import GatewayState, state_of
from control_plane.gateway.http import MsgspecResponse, error_response, install_error_handlers, openapi_components
from control_plane.gateway.metrics import GatewayMetrics, MetricsMiddleware
from mnemos.client import Client
from mnemos.config import NatsSettings
from mnemos.errors import MnemosError, PayloadTooLarge
from mnemos.names import SERVICE_NAME, SERVICE_VERSION

__all__ = ["create_app"]

log = logging.getLogger("mnemos.gateway")

_DESCRIPTION = """\
The HTTP front door of MNEMOS: submit and follow inference jobs, and an OpenAI-compatible
completions API. Errors are one envelope, `{"error": {"code", "message", "retryable",
"details"}}`, with the status of its `code` (see docs/http-api.md). With API keys configured,
send `Authorization: Bearer <key>`: a key acts for its tenant, which sees only its own jobs.
"""


def create_app(
    settings: GatewaySettings,
    nats_settings: NatsSettings | None = None,
    *,
    client: Client | None = None,
    keys: ApiKeys | None = None,
) -> FastAPI:
    """The gateway app. It connects its own NATS client in its lifespan unless ``client`` is given."""
    keys = keys if keys is not None else ApiKeys.from_settings(settings)
    state = GatewayState(settings=settings, keys=keys, metrics=GatewayMetrics(), client=client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = None
        if state.client is None:
            owned = state.client = await Client.connect(nats_settings or NatsSettings(),
                                                         request_timeout=settings.request_timeout_s,
                                                         name="mnemos-gateway")
        try:
            yield
        finally:
            await state.drain()
            if owned is not None:
                await owned.close()
                state.client = None

    app = FastAPI(
        title="MNEMOS",
        version=SERVICE_VERSION,
        description=_DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "jobs", "description": "Submit, follow, cancel and retry jobs"},
            {"name": "openai", "description": "OpenAI-compatible completions"},
            {"name": "models"}, {"name": "workers"}, {"name": "pools"}, {"name": "tenants"}, {"name": "apps"},
            {"name": "ops"},
        ],
    )
    app.state.gateway = state
    install_error_handlers(app, settings.retry_after_s)
    app.include_router(jobs.router)
    app.include_router(openai_api.router)
    app.include_router(pools.router)
    app.include_router(tenants.router)
    app.include_router(apps.router)
    _ops_routes(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, tags=app.openapi_tags)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers")
    async def healthz() -> Response:
        return MsgspecResponse({"status": "ok"})

    @app.get("/readyz", tags=["ops"], summary="Readiness: NATS is connected and a control plane answers",
             responses={503: {"description": "Not ready; the body says why"}})
    async def readyz(request: Request) -> Response:
        state = state_of(request)
        try:
            if state.client is None:
                raise MnemosError("the gateway is not connected to NATS")
            reply = await state.client.nc.request(f"$SRV.PING.{SERVICE_NAME}", b"", timeout=2.0)
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the reason is shown
            message = e.message if isinstance(e, MnemosError) else f"no control plane answers: {type(e).__name__}"
            return MsgspecResponse({"status": "unavailable", "reason": message}, status_code=503,
                                   headers={"Retry-After": str(state.settings.retry_after_s)})
        try:
            ping = json.loads(reply.data)
        except ValueError:
            ping = {}
        return MsgspecResponse({"status": "ready", "control_plane": ping.get("id")})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics of this gateway",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        body, content_type = state_of(request).metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})


class BodyLimit:
    """413 ``payload_too_large`` for a body over ``max_bytes``, declared or streamed.

    An ASGI middleware that reads the whole body (bounded by ``max_bytes``) before the app
    sees the request: an oversized body, chunked or not, is answered 413 without the app
    ever running, so no route can turn it into another error; a client that goes away
    mid-body gets no answer and leaves nothing in the log. The app then reads the body
    from memory, and later ``receive`` calls (a disconnect during a stream) pass through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nobody to answer
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")
        await error_response(err.info(), err.status)(scope, receive, send)
