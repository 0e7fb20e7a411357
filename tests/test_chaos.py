"""Short versions of the chaos runs (`python -m loadtest chaos ...`): nothing lost, nothing twice."""

from __future__ import annotations

import pytest

from loadtest.chaos import ChaosOptions, run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


async def test_workers_killed_every_second() -> None:
    res = await run_chaos(ChaosOptions(jobs=600, workers=3, kill_every=1.0, rate=150, max_job_ms=50,
                                       deadline_s=120, quiet=True))
    assert res.worker_kills >= 2, res.summary()
    assert res.submitted == 600 and res.lost == 0 and res.duplicated == 0, res.summary()
    assert res.completed == 600, res.summary()


async def test_control_plane_killed_and_restarted() -> None:
    res = await run_chaos(ChaosOptions(jobs=600, workers=2, kill_every=1.0, kill_control_plane=True, rate=120,
                                       deadline_s=120, quiet=True))
    assert res.control_plane_kills == 1 and res.submit_retries > 0, res.summary()
    assert res.submitted == 600 and res.lost == 0 and res.duplicated == 0, res.summary()


async def test_nats_node_killed_in_a_three_node_cluster() -> None:
    res = await run_chaos(ChaosOptions(jobs=400, workers=2, kill_every=1.0, cluster=True, kill_nats_node="restart",
                                       rate=80, deadline_s=150, quiet=True))
    assert res.nats_kills == 1, res.summary()
    assert res.submitted == 400 and res.lost == 0 and res.duplicated == 0, res.summary()
