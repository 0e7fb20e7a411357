"""Prometheus plumbing shared by every MNEMOS process: buckets, rendering, an HTTP endpoint.

Each component instance (a control plane, a worker, a gateway) keeps its own
:class:`~prometheus_client.CollectorRegistry`, so several can share a process (tests do)
and each exports only what it measured; Prometheus sums counters across processes. The
metrics themselves are declared in one module per package (``control_plane.metrics``,
``neuron_runtime.metrics``).

The endpoint is prometheus_client's ASGI app served by uvicorn on the component's event
loop (:mod:`mnemos.asgi`), not in prometheus_client's thread: collectors that read a
component's state at scrape time then read it on the thread that changes it, and a scrape
can first refresh data over NATS (``before_scrape``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client.registry import Collector

from mnemos.errors import MnemosError

if TYPE_CHECKING:  # the HTTP side (uvicorn, the exposition formats) is imported when first served
    from starlette.types import Receive, Scope, Send

    from mnemos.asgi import AsgiServer

__all__ = [
    "LATENCY_BUCKETS",
    "TOKENS_PER_SECOND_BUCKETS",
    "METRICS_DISABLED",
    "METRICS_PATH",
    "MetricsServer",
    "MetricsUnavailable",
    "render",
    "serve_metrics",
]

log = logging.getLogger("mnemos.metrics")

#: Seconds, from a quarter of a millisecond (an API call) to ten minutes (a cold model load).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
#: Generated tokens per second of one job, from a slow CPU model to a batched GPU one.
TOKENS_PER_SECOND_BUCKETS: tuple[float, ...] = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
)
#: A ``metrics_port`` setting of this value turns the endpoint off (0 picks a free port).
METRICS_DISABLED = -1
METRICS_PATH = "/metrics"

#: A scrape must send its request (and get its refresh) within this long.
_REQUEST_TIMEOUT_S = 10.0
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class MetricsUnavailable(MnemosError, OSError):
    """The metrics endpoint cannot listen (its port is taken, or the host is not local)."""

    code = "metrics_unavailable"
    status = 503


def render(registry: Collector, accept: str = "") -> tuple[bytes, str]:
    """``registry`` in the exposition format the ``Accept`` header asks for (Prometheus
    text by default, OpenMetrics on request): (body, content type)."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class MetricsServer:
    """``GET /metrics`` for one registry (prometheus_client's ASGI app on uvicorn, on the
    component's own event loop); :meth:`close` stops it."""

    def __init__(
        self,
        registry: Collector,
        host: str,
        before_scrape: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.before_scrape = before_scrape
        from prometheus_client import make_asgi_app  # (and uvicorn below) only where metrics are served

        self._metrics_app = make_asgi_app(registry)
        self._http: AsgiServer | None = None

    @property
    def port(self) -> int:
        return self._http.port if self._http is not None else 0

    @property
    def url(self) -> str:
        """Where to scrape it; a wildcard bind is advertised under this machine's hostname."""
        host = socket.gethostname() if self.host in _WILDCARD_HOSTS else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{METRICS_PATH}"

    async def start(self, port: int, hint: str = "") -> None:
        """Listen on ``port`` (0: a free one); :class:`MetricsUnavailable` if it cannot."""
        if self._http is not None:
            return
        from mnemos.asgi import AsgiServer

        http = AsgiServer(self._app, self.host, port, graceful_timeout_s=1.0)
        try:
            await http.start()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
            raise MetricsUnavailable(
                f"cannot serve metrics on {self.host}:{port}: {reason}{f' ({hint})' if hint else ''}"
            ) from e
        self._http = http

    async def close(self) -> None:
        """Stop listening; open scrapes get a second to finish. Safe to call twice."""
        http, self._http = self._http, None
        if http is not None:
            await http.stop()

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != METRICS_PATH:
            await _plain(send, 404, f"metrics are at {METRICS_PATH}\n")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, "only GET\n")
            return
        if self.before_scrape is not None:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                    await self.before_scrape()
            except Exception as e:  # the last values are still worth serving
                log.warning("refreshing metrics before a scrape failed: %r", e)
        await self._metrics_app(scope, receive, send)


async def _plain(send: Send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def serve_metrics(
    registry: Collector,
    host: str,
    port: int,
    *,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
    hint: str = "",
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one, see ``.port``).

    ``before_scrape`` runs before each scrape (to refresh what collectors read); ``hint``
    is added to the :class:`MetricsUnavailable` raised when the port cannot be bound.
    """
    server = MetricsServer(registry, host, before_scrape)
    await server.start(port, hint)
    log.info("metrics at %s", server.url)
    return server
