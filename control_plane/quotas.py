"""Per-tenant quotas: queued jobs, running jobs and submissions per second.

The operator sets them with ``tenants.set`` (``mnemos tenants set``, ``PUT
/v1/tenants/{name}``); they live in ``<ns>_tenants`` (one key per tenant) and every
control plane follows the bucket. A tenant's submission (``jobs.submit``, ``jobs.run``,
``jobs.start``, ``jobs.retry``) is refused with ``quota_exceeded`` (HTTP 429 with
``Retry-After``) when:

- ``max_queued``: the tenant has that many jobs waiting in the queue;
- ``max_running``: the tenant has that many jobs claimed and not ended;
- ``submit_rate``: its token bucket (``submit_burst`` tokens, refilled at ``submit_rate``
  per second) is empty; ``Retry-After`` is when the next token comes.

The counts are the control plane's job index (the ``<ns>_jobs`` bucket as it watches it),
so they trail the writes by the watch's lag: a burst of concurrent submissions can pass a
bound by the few that are in flight together. The token bucket is per control plane: with
N control planes a tenant may submit up to N times its rate. Requests without a tenant
(the operator's) have no quota.
"""

from __future__ import annotations

import math
import time

from nats.js.kv import KeyValue

from control_plane.index import JobIndex
from mnemos.connection import patiently
from mnemos.errors import QuotaExceeded, TenantNotFound
from mnemos.kvscan import mirror
from mnemos.lifecycle import HELD_STATUSES
from mnemos.messages import TenantList, TenantQuota, TenantView, decode, encode, utcnow
from mnemos.tasks import Supervisor

__all__ = ["TenantQuotas"]


class _Bucket:
    """A token bucket: ``capacity`` tokens, ``rate`` more per second."""

    __slots__ = ("capacity", "rate", "tokens", "at")

    def __init__(self, capacity: int, rate: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens, self.at = float(capacity), time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0; or, when there is none, the seconds until there is one."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class TenantQuotas:
    """The tenants' quotas, followed from their bucket, checked on each submission."""

    def __init__(self, kv: KeyValue, index: JobIndex | None) -> None:
        self.kv = kv
        self.index = index
        self.quotas: dict[str, TenantQuota] = {}
        self._buckets: dict[str, tuple[TenantQuota, _Bucket]] = {}

    async def start(self, supervisor: Supervisor) -> None:
        watcher = await patiently(self.kv.watchall, "watch the tenants bucket")
        supervisor.spawn("tenants", mirror(watcher, TenantQuota, self.quotas))

    # ------------------------------------------------------------------ admission

    def check(self, tenant: str | None) -> None:
        """Raise :class:`QuotaExceeded` if ``tenant`` may not submit a job now."""
        quota = self.quotas.get(tenant) if tenant is not None else None
        if quota is None or tenant is None:
            return
        if quota.max_queued is not None and (queued := self.count(tenant, ("queued",))) >= quota.max_queued:
            raise QuotaExceeded(f"tenant {tenant!r} has {queued} jobs queued (max_queued {quota.max_queued})",
                                details={"tenant": tenant, "quota": "max_queued", "limit": quota.max_queued,
                                         "retry_after_s": 1})
        if quota.max_running is not None and (running := self.count(tenant, HELD_STATUSES)) >= quota.max_running:
            raise QuotaExceeded(f"tenant {tenant!r} has {running} jobs running (max_running {quota.max_running})",
                                details={"tenant": tenant, "quota": "max_running", "limit": quota.max_running,
                                         "retry_after_s": 1})
        if quota.submit_rate is not None:
            wait = self._bucket(tenant, quota).take()
            if wait > 0:
                raise QuotaExceeded(
                    f"tenant {tenant!r} submits faster than {quota.submit_rate:g} jobs/s; retry in {wait:.2f}s",
                    details={"tenant": tenant, "quota": "submit_rate", "limit": quota.submit_rate,
                             "retry_after_s": max(1, math.ceil(wait))})

    def count(self, tenant: str, statuses: frozenset[str] | tuple[str, ...]) -> int:
        """The tenant's jobs in ``statuses`` as the job index sees them."""
        return 0 if self.index is None else sum(self.index.count(tenant, s) for s in statuses)

    def _bucket(self, tenant: str, quota: TenantQuota) -> _Bucket:
        held = self._buckets.get(tenant)
        if held is None or held[0] != quota:  # new, or the operator changed the quota
            assert quota.submit_rate is not None
            burst = quota.submit_burst or max(1, math.ceil(quota.submit_rate))
            held = self._buckets[tenant] = (quota, _Bucket(burst, quota.submit_rate))
        return held[1]

    # ------------------------------------------------------------------ endpoints

    def view(self, quota: TenantQuota) -> TenantView:
        return TenantView(quota=quota, queued=self.count(quota.tenant, ("queued",)),
                          running=self.count(quota.tenant, HELD_STATUSES))

    def list(self) -> TenantList:
        return TenantList(tenants=[self.view(q) for _, q in sorted(self.quotas.items())])

    async def get(self, tenant: str) -> TenantView:
        try:
            entry = await self.kv.get(tenant)
        except Exception:  # noqa: BLE001 - KeyNotFoundError / KeyDeletedError
            raise TenantNotFound(f"no quota for tenant {tenant!r}") from None
        return self.view(decode(entry.value or b"", TenantQuota))

    async def set(self, quota: TenantQuota) -> TenantView:
        import msgspec

        stored = msgspec.structs.replace(quota, updated_at=utcnow())
        await self.kv.put(quota.tenant, encode(stored))
        self.quotas[quota.tenant] = stored  # this control plane applies it at once
        return self.view(stored)

    async def delete(self, tenant: str) -> TenantView:
        view = await self.get(tenant)
        await self.kv.delete(tenant)
        self.quotas.pop(tenant, None)
        return view
