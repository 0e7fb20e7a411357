"""The provider protocol: how the autoscaler gets and gives back machines for a pool.

A provider does three things for a pool: start workers, stop one given worker, and say
what it runs. It knows nothing of jobs or NATS; the autoscaler decides which worker may
go (an idle one that drained and deregistered) and when. Providers that own machines a
cloud may take away by itself (the ``aws`` provider's termination lifecycle hook) also
report those, so the autoscaler can drain them first, and are told when they may go.

A new provider is one module in this package with a class that implements
:class:`Provider`, named in :data:`control_plane.autoscaler.providers.PROVIDERS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from mnemos.messages import PoolSpec

__all__ = ["Provider", "ProvidedWorker", "ProviderView", "WorkerLaunch", "ProviderError"]


class ProviderError(RuntimeError):
    """The provider could not do what it was asked (the autoscaler records it as a
    decision's outcome and tries again on a later tick)."""


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """What every worker of a pool is started with: the settings a worker reads from its
    environment (``MNEMOS_NATS_URL``, ``MNEMOS_NAMESPACE``, ``MNEMOS_WORKER_*``). The
    ``aws`` provider's boot script sets the same ones from the launch template."""

    pool: PoolSpec
    env: dict[str, str]


@dataclass(frozen=True, slots=True)
class ProvidedWorker:
    """One worker (a process, an instance) the provider runs for a pool."""

    worker_id: str
    #: ``starting``: asked for, not known to be running yet; ``running``: the provider
    #: sees it up (the worker may not have registered yet); ``terminating``: the provider
    #: (the cloud) is taking it away and waits for :meth:`Provider.release`.
    state: Literal["starting", "running", "terminating"]
    started_at: datetime | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProviderView:
    """What a provider runs for one pool."""

    workers: list[ProvidedWorker] = field(default_factory=list)
    #: Workers asked for whose id is not known yet (an Auto Scaling group's desired
    #: capacity above its instances); they count as starting.
    pending: int = 0


class Provider(Protocol):
    """One source of workers (``local`` processes, ``aws`` Auto Scaling groups)."""

    #: The name pools use in ``provider``.
    name: str

    async def prepare(self) -> None:
        """Get ready to start workers fast (the ``local`` provider pre-starts its zygote);
        called once when the autoscaler starts."""
        ...

    async def start(self, launch: WorkerLaunch, count: int) -> list[str]:
        """Start ``count`` more workers of ``launch.pool``; the ids known now (a cloud
        provider may return none: its new instances show up in :meth:`list`)."""
        ...

    async def stop(self, pool: PoolSpec, worker_id: str) -> None:
        """Remove exactly this worker (it has drained and deregistered, or never
        registered) and shrink the pool's capacity by one. Stopping one that is gone is
        not an error."""
        ...

    async def list(self, pool: PoolSpec) -> ProviderView:
        """What the provider runs for ``pool`` now."""
        ...

    async def protect(self, pool: PoolSpec, busy: set[str], idle: set[str]) -> None:
        """Busy workers must not be taken away by the provider's own scale-in; idle ones
        may (a provider without its own scale-in does nothing)."""
        ...

    async def release(self, pool: PoolSpec, worker_id: str) -> None:
        """A ``terminating`` worker has drained and deregistered: let the provider finish
        taking it away (``aws``: complete the lifecycle action)."""
        ...

    async def close(self) -> None:
        """Let go of clients and helper processes; the workers keep running (another
        autoscaler may take over)."""
        ...
