"""The control plane's job index: a job moves between the lists of its statuses (and its
tenant's) as its record changes, and is found in each one it belongs to."""

from __future__ import annotations

from typing import Any

from control_plane.index import DEAD_LETTER, JobIndex
from mnemos.client import job_spec
from mnemos.messages import Attempt, JobRecord, encode, utcnow


def _record(job_id: str, status: str, *, tenant: str | None = None, worker: str | None = None,
            dead_letter: bool = False) -> bytes:
    now = utcnow()
    attempts = [Attempt(attempt=1, worker_id=worker, started_at=now,
                        ended_at=None if status == "running" else now)] if worker else []
    return encode(JobRecord(job_id=job_id, status=status, spec=job_spec("demo-fn:v1", function="noop"),  # type: ignore[arg-type]
                            runtime="python", created_at=now, updated_at=now, tenant=tenant, worker_id=worker,
                            attempt=len(attempts), attempts=attempts, dead_letter=dead_letter))


def _ids(index: JobIndex, tenant: str | None = None, status: str | None = None, **kw: Any) -> list[str]:
    statuses = {status} if status else None
    return index.page(tenant=tenant, statuses=statuses, model=None, cursor=None, limit=100, max_scan=1000, **kw)[0]


def test_a_job_moves_between_status_lists_and_stays_in_its_tenants() -> None:
    index = JobIndex(kv=None)  # type: ignore[arg-type]
    index._apply("01A", _record("01A", "queued", tenant="acme"))
    index._apply("01B", _record("01B", "queued"))
    assert _ids(index, status="queued") == ["01B", "01A"] and _ids(index, "acme") == ["01A"]
    assert index.waiting_count == 2

    index._apply("01A", _record("01A", "running", tenant="acme", worker="w1"))
    assert _ids(index, status="queued") == ["01B"] and _ids(index, status="running") == ["01A"]
    assert _ids(index, "acme") == ["01A"] and _ids(index, "acme", "running") == ["01A"]
    assert _ids(index) == ["01B", "01A"]
    assert [e.job_id for e in index.held_by("w1")] == ["01A"] and index.waiting_count == 1

    index._apply("01A", _record("01A", "failed", tenant="acme", worker="w1", dead_letter=True))
    assert _ids(index, status="running") == [] and _ids(index, "acme", "failed") == ["01A"]
    assert _ids(index, "acme", dead_letter=True) == ["01A"] and _ids(index, dead_letter=True) == ["01A"]
    assert index.held_by("w1") == [] and _ids(index) == ["01B", "01A"]

    index._remove("01A")
    assert _ids(index, "acme") == [] and _ids(index) == ["01B"] and (None, DEAD_LETTER) not in index._lists
