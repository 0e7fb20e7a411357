"""Per-tenant quotas (``tenants.*``, ``control_plane/quotas.py``) on a real control plane:
queued and running bounds and the submission rate, each refused with ``quota_exceeded``
(HTTP 429 with ``Retry-After``), set only by the operator, over NATS, HTTP and the CLI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from launchers.cli import cli
from mnemos.client import job_spec
from mnemos.config import NatsSettings
from mnemos.errors import Forbidden, QuotaExceeded, TenantNotFound, ValidationFailed
from mnemos.messages import TenantQuota

from .conftest import assert_eventually


async def _queued(client: Any, tenant: str) -> int:
    return int((await client.tenant_quota(tenant)).queued)


async def test_max_queued_refuses_the_next_submission(control_plane: Any, demo_fn: Any, client: Any) -> None:
    acme, other = client.for_tenant("acme"), client.for_tenant("other")
    await client.set_tenant_quota(TenantQuota(tenant="acme", max_queued=2))
    first = [await acme.submit(job_spec("demo-fn:v1", args=[i])) for i in range(2)]  # no worker: they wait
    await assert_eventually(lambda: _queued(client, "acme"), message="the index counting acme's queue")
    await assert_eventually(lambda: _queued_is(client, "acme", 2), message="both queued jobs counted")
    with pytest.raises(QuotaExceeded) as refused:
        await acme.submit(job_spec("demo-fn:v1", args=["third"]))
    assert refused.value.details is not None and refused.value.details["quota"] == "max_queued"
    assert refused.value.details["retry_after_s"] >= 1 and refused.value.retryable
    # Nothing was queued for the refused one; other tenants and the operator are not bound.
    assert {j.job_id for j in (await acme.list(status=["queued"])).jobs} == {j.job_id for j in first}
    await other.submit(job_spec("demo-fn:v1", args=["other"]))
    await client.submit(job_spec("demo-fn:v1", args=["operator"]))
    # A cancel frees a place.
    await acme.cancel(first[0].job_id)
    await assert_eventually(lambda: _queued_is(client, "acme", 1), message="the cancel counted")
    await acme.submit(job_spec("demo-fn:v1", args=["after"]))


async def _queued_is(client: Any, tenant: str, n: int) -> bool:
    return await _queued(client, tenant) == n


async def test_submit_rate_is_a_token_bucket(control_plane: Any, demo_fn: Any, client: Any) -> None:
    acme = client.for_tenant("acme")
    # One token every 1000 s: the burst of 3 passes, the fourth is refused with when to retry.
    await client.set_tenant_quota(TenantQuota(tenant="acme", submit_rate=0.001, submit_burst=3))
    for i in range(3):
        await acme.submit(job_spec("demo-fn:v1", args=[i]))
    with pytest.raises(QuotaExceeded) as refused:
        await acme.submit(job_spec("demo-fn:v1", args=["too fast"]))
    assert refused.value.details is not None and refused.value.details["quota"] == "submit_rate"
    assert refused.value.details["retry_after_s"] > 100
    # A changed quota is a fresh bucket.
    await client.set_tenant_quota(TenantQuota(tenant="acme", submit_rate=1000))
    await acme.submit(job_spec("demo-fn:v1", args=["again"]))


async def test_max_running_counts_claimed_jobs(control_plane: Any, start_worker: Any, demo_fn: Any,
                                               client: Any) -> None:
    await start_worker(runtimes=["python"])
    acme = client.for_tenant("acme")
    await client.set_tenant_quota(TenantQuota(tenant="acme", max_running=1))
    sleeping = await acme.submit(job_spec("demo-fn:v1", function="sleep", args=[60]))
    await assert_eventually(lambda: _running_is(client, "acme", 1), timeout=30, message="the sleep job running")
    with pytest.raises(QuotaExceeded) as refused:
        await acme.submit(job_spec("demo-fn:v1", args=["second"]))
    assert refused.value.details is not None and refused.value.details["quota"] == "max_running"
    await acme.cancel(sleeping.job_id)
    await assert_eventually(lambda: _running_is(client, "acme", 0), timeout=30, message="the cancel ended it")
    done = await acme.run(job_spec("demo-fn:v1", function="add", args=[1, 2]), timeout=30)
    assert done.output is not None and done.output.result == 3


async def _running_is(client: Any, tenant: str, n: int) -> bool:
    return int((await client.tenant_quota(tenant)).running) == n


async def test_quotas_are_the_operators(control_plane: Any, client: Any) -> None:
    acme = client.for_tenant("acme")
    await client.set_tenant_quota(TenantQuota(tenant="acme", max_queued=5))
    await client.set_tenant_quota(TenantQuota(tenant="other", max_queued=7))
    with pytest.raises(Forbidden):
        await acme.set_tenant_quota(TenantQuota(tenant="acme", max_queued=1000))
    with pytest.raises(Forbidden):
        await acme.delete_tenant_quota("acme")
    assert (await acme.tenant_quota("acme")).quota.max_queued == 5  # its own, read-only
    with pytest.raises(TenantNotFound):
        await acme.tenant_quota("other")  # another tenant's does not exist for it
    assert [t.quota.tenant for t in await acme.tenant_quotas()] == ["acme"]
    assert [t.quota.tenant for t in await client.tenant_quotas()] == ["acme", "other"]
    removed = await client.delete_tenant_quota("other")
    assert removed.quota.max_queued == 7
    with pytest.raises(TenantNotFound):
        await client.tenant_quota("other")
    with pytest.raises(ValidationFailed):
        await client.set_tenant_quota(TenantQuota(tenant="acme", max_queued=-1))


async def test_http_quota_is_a_429_with_retry_after(control_plane: Any, demo_fn: Any, start_gateway: Any) -> None:
    gateway = await start_gateway(api_keys="k-ops=ops,k-acme=acme", operator_tenants="ops")
    ops, acme = {"authorization": "Bearer k-ops"}, {"authorization": "Bearer k-acme"}
    job = {"model": {"family": "demo-fn", "version": "v1"}, "input": {"args": ["x"]}}
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        quota = {"tenant": "acme", "submit_rate": 0.001, "submit_burst": 1}
        assert (await http.put("/v1/tenants/acme", json=quota, headers=acme)).status_code == 403
        set_ = await http.put("/v1/tenants/acme", json=quota, headers=ops)
        assert set_.status_code == 200, set_.text
        assert set_.json()["quota"]["submit_burst"] == 1
        assert (await http.post("/v1/jobs", json=job, headers=acme)).status_code == 202
        refused = await http.post("/v1/jobs", json=job, headers=acme)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert int(refused.headers["retry-after"]) > 100
        listed = await http.get("/v1/tenants", headers=ops)
        assert [t["quota"]["tenant"] for t in listed.json()["tenants"]] == ["acme"]
        assert (await http.delete("/v1/tenants/acme", headers=ops)).status_code == 200
        assert (await http.get("/v1/tenants/acme", headers=ops)).status_code == 404


async def test_tenants_cli(control_plane: Any, nats_settings: NatsSettings) -> None:
    runner = CliRunner()
    base = ["--nats-url", nats_settings.nats_url, "--namespace", nats_settings.namespace]

    async def mnemos(*argv: str) -> Any:
        return await asyncio.to_thread(runner.invoke, cli, [*base, *argv])

    done = await mnemos("tenants", "set", "acme", "--max-queued", "100", "--max-running", "8", "--rate", "20",
                        "--burst", "40")
    assert done.exit_code == 0, done.output
    got = await mnemos("-o", "json", "tenants", "get", "acme")
    assert got.exit_code == 0, got.output
    quota = json.loads(got.output)["quota"]
    assert (quota["max_queued"], quota["max_running"], quota["submit_rate"], quota["submit_burst"]) == (100, 8, 20, 40)
    shown = await mnemos("tenants", "ls")
    assert shown.exit_code == 0 and "acme" in shown.output and "0/100" in shown.output, shown.output
    bad = await mnemos("tenants", "set", "acme", "--max-queued", "-3")
    assert bad.exit_code == 4, bad.output
    assert (await mnemos("tenants", "rm", "acme")).exit_code == 0
    missing = await mnemos("tenants", "get", "acme")
    assert missing.exit_code == 3 and "tenant_not_found" in missing.output, missing.output
