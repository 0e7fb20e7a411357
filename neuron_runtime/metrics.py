"""A worker's Prometheus metrics, one registry per :class:`~neuron_runtime.worker.Worker`.

Per job the executor adds a few observations to in-process counters and histograms (no
I/O). Slots, jobs in progress and the warm cache's hit and miss counts are not tracked
separately: they are read from the worker, its executor and its cache tiers when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mnemos.messages import JobOutput, Timings
from mnemos.metrics import LATENCY_BUCKETS, TOKENS_PER_SECOND_BUCKETS

__all__ = ["WorkerMetrics", "WorkerState"]


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What a scrape reads from the worker."""

    slots: int
    busy_slots: int
    jobs_in_progress: int
    memory_hits: int
    memory_misses: int
    disk_hits: int
    disk_misses: int


class WorkerMetrics:
    """Every ``mnemos_*`` metric one worker exports, in its own registry.

    ``state`` returns the worker's current :class:`WorkerState` (None before it started).
    """

    def __init__(self, state: Callable[[], WorkerState | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_finished = Counter(
            "mnemos_jobs_finished", "Jobs this process recorded in a terminal state, by status and runtime.",
            ["status", "runtime"], registry=r,
        )
        self.queue_wait = Histogram(
            "mnemos_job_queue_wait_seconds", "From queued (or requeued) to claimed by this worker, per attempt.",
            ["runtime"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.model_load = Histogram(
            "mnemos_model_load_seconds", "Model loads into memory (memory-cache misses), including any download.",
            ["runtime"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_token = Histogram(
            "mnemos_time_to_first_token_seconds", "From the start of execution to the first streamed chunk.",
            ["runtime"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.execution = Histogram(
            "mnemos_job_execution_seconds", "Execution time of an attempt on a loaded model, whatever its outcome.",
            ["runtime"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens_per_second = Histogram(
            "mnemos_tokens_per_second", "Completion tokens per second of execution, per completed text job.",
            ["runtime"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=r,
        )
        r.register(_StateCollector(state))
        # Label children resolved once per runtime / status, not per job.
        self._finished: dict[tuple[str, str], Counter] = {}
        self._per_runtime: dict[str, tuple[Histogram, Histogram, Histogram, Histogram, Histogram]] = {}

    def job_finished(self, status: str, runtime: str) -> None:
        """The worker recorded a job's terminal state."""
        child = self._finished.get((status, runtime))
        if child is None:
            child = self._finished[(status, runtime)] = self.jobs_finished.labels(status, runtime)
        child.inc()

    def attempt_ended(self, runtime: str, status: str, timings: Timings, output: JobOutput | None) -> None:
        """Observe where the time of one claimed attempt went (from its :class:`Timings`)."""
        h = self._per_runtime.get(runtime)
        if h is None:
            h = self._per_runtime[runtime] = (
                self.queue_wait.labels(runtime), self.model_load.labels(runtime), self.first_token.labels(runtime),
                self.execution.labels(runtime), self.tokens_per_second.labels(runtime),
            )
        queue_wait, model_load, first_token, execution, tokens_per_second = h
        if timings.queue_ms is not None:
            queue_wait.observe(timings.queue_ms / 1000.0)
        if timings.cache_hit is False and timings.load_ms is not None:
            model_load.observe(timings.load_ms / 1000.0)
        if timings.first_token_ms is not None:
            first_token.observe(timings.first_token_ms / 1000.0)
        if timings.run_ms is None:
            return
        execution.observe(timings.run_ms / 1000.0)
        tokens = output.metadata.get("completion_tokens") if output is not None else None
        if status == "completed" and isinstance(tokens, int) and tokens > 0 and timings.run_ms > 0:
            tokens_per_second.observe(tokens / (timings.run_ms / 1000.0))


class _StateCollector:
    """Slot and in-progress gauges and the warm cache's counters, read when scraped."""

    def __init__(self, state: Callable[[], WorkerState | None]) -> None:
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return list(_families())

    def collect(self) -> Iterable[Metric]:
        s = self._state()
        if s is None:
            return []
        slots, busy, in_progress, hits, misses = _families()
        slots.add_metric([], s.slots)
        busy.add_metric([], s.busy_slots)
        in_progress.add_metric([], s.jobs_in_progress)
        hits.add_metric(["memory"], s.memory_hits)
        hits.add_metric(["disk"], s.disk_hits)
        misses.add_metric(["memory"], s.memory_misses)
        misses.add_metric(["disk"], s.disk_misses)
        return [slots, busy, in_progress, hits, misses]


def _families() -> tuple[
    GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily
]:
    return (
        GaugeMetricFamily("mnemos_worker_slots", "Jobs this worker runs at once at most (max_concurrent_jobs)."),
        GaugeMetricFamily("mnemos_worker_busy_slots", "Slots taken by jobs this worker holds."),
        GaugeMetricFamily("mnemos_jobs_in_progress", "Job attempts executing on this worker (claimed, not ended)."),
        CounterMetricFamily("mnemos_model_cache_hits", "Warm-cache hits by tier: memory (a loaded model), "
                            "disk (artifacts already downloaded).", labels=["tier"]),
        CounterMetricFamily("mnemos_model_cache_misses", "Warm-cache misses by tier: memory (a model load), "
                            "disk (a download).", labels=["tier"]),
    )
