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


def test_the_documented_command_runs_as_a_user_runs_it() -> None:
    """`python -m loadtest chaos` from a shell with no MNEMOS_* variable set, with several
    workers: nothing the suite's fixtures set (ports above all) may be needed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "chaos", "--jobs", "300", "--workers", "3", "--kill-every", "1",
         "--rate", "150"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "submitted 300 / completed 300 / failed 0 / lost 0 / untracked 0 / duplicated 0" in proc.stdout, proc.stdout
