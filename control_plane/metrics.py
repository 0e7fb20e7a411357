"""The control plane's Prometheus metrics, one registry per :class:`ControlPlane`.

Requests and the jobs the control plane itself ends (cancelled while queued, or ended by
the reaper after their worker died) are counted as they happen. The queue depth and the
workers by status are read at scrape time from what the control plane keeps anyway: the
backpressure counts of the dispatch stream (refreshed before a scrape if stale) and the
reaper's watch of the workers bucket. Those two are the same for every control plane of a
deployment: aggregate them with ``max``, not ``sum``.

:class:`MicroStats` keeps what ``nats micro stats`` shows for each endpoint.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from typing import get_args

from nats.micro.service import EndpointStats
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from control_plane.backpressure import QueueDepth
from control_plane.reaper import Reaper
from mnemos.errors import MnemosError
from mnemos.messages import WorkerStatus
from mnemos.metrics import LATENCY_BUCKETS
from mnemos.names import PRIORITIES, RUNTIMES

__all__ = ["ControlPlaneMetrics", "MicroStats", "OK"]

#: The ``code`` label of a request that succeeded (failures carry their error code).
OK = "ok"


class ControlPlaneMetrics:
    """Every ``mnemos_*`` metric one control plane exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.api_requests = Counter(
            "mnemos_api_requests", "API requests served, by micro endpoint and result code ('ok' or the error code).",
            ["endpoint", "code"], registry=self.registry,
        )
        self.api_seconds = Histogram(
            "mnemos_api_request_seconds", "Time to serve an API request (jobs.run: until the job is queued).",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.jobs_finished = Counter(
            "mnemos_jobs_finished", "Jobs this process recorded in a terminal state, by status and runtime.",
            ["status", "runtime"], registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)
        # Label children resolved once: a request costs two locked adds, no label lookup.
        self._per_request: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        #: The numbers of ``$SRV.STATS`` (``nats micro stats``), per micro endpoint.
        self.micro = MicroStats()

    def watch(self, depth: QueueDepth, reaper: Reaper) -> None:
        """Report the queue depth and the workers these two know (once they run)."""
        self._state.depth, self._state.reaper = depth, reaper

    async def refresh(self) -> None:
        """Before a scrape: refresh the queue depth if it is stale."""
        if self._state.depth is not None:
            await self._state.depth.ensure_fresh()

    def request(self, endpoint: str, code: str, seconds: float) -> None:
        children = self._per_request.get((endpoint, code))
        if children is None:
            children = self._per_request[(endpoint, code)] = (
                self.api_requests.labels(endpoint, code), self.api_seconds.labels(endpoint)
            )
        children[0].inc()
        children[1].observe(seconds)

    def job_finished(self, status: str, runtime: str) -> None:
        self.jobs_finished.labels(status, runtime).inc()


@dataclass
class _Served:
    """One endpoint's answered requests: how many, how many errors, their time."""

    answered: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str = ""


class MicroStats:
    """What ``nats micro stats`` shows for each endpoint, kept here.

    nats.micro times and counts the handler it calls; ours starts a task per request and
    returns, so it would see no error and almost no time. This counts each request when
    its task ends, and is the service's ``stats_handler``: nats.micro calls it for every
    endpoint's :class:`EndpointStats` as it answers ``$SRV.STATS`` and sends that object,
    so it fills in the errors and times (nats.micro's own count of requests received
    stays: it is exact, in-flight ones included).
    """

    def __init__(self) -> None:
        self._served: dict[str, _Served] = {}

    def served(self, endpoint: str, elapsed_ns: int, error: MnemosError | None) -> None:
        """Count a request of micro endpoint ``endpoint`` as answered (with ``error``, if any)."""
        served = self._served.get(endpoint)
        if served is None:
            served = self._served[endpoint] = _Served()
        served.answered += 1
        served.processing_ns += elapsed_ns
        if error is not None:
            served.errors += 1
            served.last_error = f"{error.code}: {error.message}"

    def __call__(self, stats: EndpointStats) -> None:
        """Fill in ``stats`` (its ``data``, what this returns, stays null)."""
        served = self._served.get(stats.name, _Served())
        stats.num_errors = served.errors
        stats.last_error = served.last_error or None
        stats.processing_time = served.processing_ns
        stats.average_processing_time = served.processing_ns // max(1, served.answered)


class _StateCollector:
    """``mnemos_queue_depth`` and ``mnemos_workers``, read when scraped."""

    def __init__(self) -> None:
        self.depth: QueueDepth | None = None
        self.reaper: Reaper | None = None

    def describe(self) -> Iterable[Metric]:
        return [_queue_depth(), _workers()]

    def collect(self) -> Iterable[Metric]:
        if self.depth is not None:
            depth = _queue_depth()
            by_level = self.depth.by_level
            levels = {(r, p) for r in RUNTIMES for p in PRIORITIES} | set(by_level)
            for runtime, priority in sorted(levels):
                depth.add_metric([runtime, str(priority)], by_level.get((runtime, priority), 0))
            yield depth
        if self.reaper is not None:
            workers = _workers()
            by_status = Tally(w.status for w in self.reaper.live.values())
            for status in get_args(WorkerStatus):
                workers.add_metric([status], by_status.get(status, 0))
            yield workers


def _queue_depth() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "mnemos_queue_depth",
        "Jobs in the dispatch stream (queued, running or waiting to retry: not yet acknowledged), "
        "by runtime and priority.",
        labels=["runtime", "priority"],
    )


def _workers() -> GaugeMetricFamily:
    return GaugeMetricFamily("mnemos_workers", "Live workers (records in the workers bucket), by status.",
                             labels=["status"])
