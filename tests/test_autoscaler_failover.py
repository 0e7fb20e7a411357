"""The burst benchmark, small, with the acting autoscaler SIGKILLed mid-burst: real
processes (embedded nats-server, control plane, two autoscalers, forked local workers).
A standby takes over, and no job is lost, duplicated or interrupted; no worker is started
beyond what the window asked for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtest.autoscale_bench import BurstOptions, bench_burst
from loadtest.bench import local_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_a_standby_takes_over_mid_burst_and_no_job_suffers(tmp_path: Path) -> None:
    options = BurstOptions(steps=2, high_s=3.0, low_s=8.0, rate=12.0, job_s=0.2, max_workers=3, slots=2,
                           window_s=1.0, kill_autoscaler=True, out=tmp_path / "burst")
    with local_stack(workers=0, slots=2, autoscale=True, max_workers=3) as stack:
        result = asyncio.run(bench_burst(stack.settings, stack, options))
    assert (result["lost"], result["duplicated"], result["interrupted"]) == (0, 0, 0), result["steps"]
    assert sum(step["jobs"] for step in result["steps"]) == 2 * 36
    assert [who for _, who in result["leaders"]][-1] == "standby", result["leaders"]
    assert result["standby_acting_at_s"] > result["autoscaler_killed_at_s"]
    assert result["workers_beyond_desired"] == 0 and result["max_workers_seen"] <= 3
    assert json.loads((tmp_path / "burst.json").read_text())["lost"] == 0
    assert (tmp_path / "burst.png").stat().st_size > 10_000  # the plot was drawn
