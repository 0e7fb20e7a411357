"""The autoscaler's Prometheus metrics (``mnemos_autoscaler_*``, ``mnemos_pool_*``).

Only the acting autoscaler sets the pool gauges; a standby exports ``mnemos_autoscaler_leader
0`` and no pool series, so a ``sum`` over instances counts each pool once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AutoscalerMetrics", "PROVISIONING_BUCKETS"]

#: Provider start -> worker registered: a forked local worker in well under a second, a
#: fresh process in a few, a cloud instance in minutes.
PROVISIONING_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class AutoscalerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.leader = Gauge("mnemos_autoscaler_leader", "1 while this autoscaler holds the lease and acts.",
                            registry=self.registry)
        self.workers = Gauge("mnemos_pool_workers",
                             "Workers of a pool by state (desired: what the autoscaler aims at).",
                             ["pool", "state"], registry=self.registry)
        self.messages = Gauge("mnemos_pool_messages", "Dispatch messages (queued or running jobs) held for a pool.",
                              ["pool"], registry=self.registry)
        self.at_max = Gauge("mnemos_pool_at_max", "1 while a pool at max_workers has more work than it can take.",
                            ["pool"], registry=self.registry)
        self.decisions = Counter("mnemos_pool_decisions", "Scaling decisions, by pool and action.",
                                 ["pool", "action"], registry=self.registry)
        self.provisioning = Histogram(
            "mnemos_pool_provisioning_seconds", "From asking the provider for a worker to its registration.",
            ["pool", "provider"], buckets=PROVISIONING_BUCKETS, registry=self.registry,
        )
        self.tick_seconds = Histogram("mnemos_autoscaler_tick_seconds", "Time of one autoscaler round.",
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                      registry=self.registry)

    def pool(self, pool: str, *, desired: int, starting: int, ready: int, busy: int, draining: int,
             messages: int, at_max: bool) -> None:
        for state, n in (("desired", desired), ("starting", starting), ("ready", ready), ("busy", busy),
                         ("draining", draining)):
            self.workers.labels(pool, state).set(n)
        self.messages.labels(pool).set(messages)
        self.at_max.labels(pool).set(1 if at_max else 0)

    def forget(self, pool: str) -> None:
        for state in ("desired", "starting", "ready", "busy", "draining"):
            try:
                self.workers.remove(pool, state)
            except KeyError:
                pass
        for gauge in (self.messages, self.at_max):
            try:
                gauge.remove(pool)
            except KeyError:
                pass
