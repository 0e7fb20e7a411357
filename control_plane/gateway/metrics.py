"""The gateway's own Prometheus metrics (``mnemos_http_*``, ``mnemos_openai_*``)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnemos.metrics import LATENCY_BUCKETS, render

__all__ = ["GatewayMetrics", "MetricsMiddleware"]


class GatewayMetrics:
    """One registry per gateway app (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mnemos_http_requests", "HTTP requests answered, by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "mnemos_http_request_duration_seconds", "Time to answer an HTTP request (whole stream for SSE)",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.streams = Gauge(
            "mnemos_http_streams_active", "Open event streams", ["kind"], registry=self.registry,
        )
        self.tokens = Counter(
            "mnemos_openai_tokens", "Tokens of OpenAI-compatible requests", ["kind"], registry=self.registry,
        )

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): Prometheus text, or OpenMetrics if ``accept`` asks for it."""
        return render(self.registry, accept)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
