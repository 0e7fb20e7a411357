"""The autoscaler with the local provider: real worker processes forked from a real zygote,
a real nats-server, the real control plane; scale from zero, scale down only idle workers
after the window, takeover by a second autoscaler, decisions on record."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from control_plane.autoscaler import Autoscaler, AutoscalerSettings
from control_plane.autoscaler.providers.local import LocalProvider, stop_local_workers
from mnemos.config import NatsSettings
from mnemos.errors import Conflict, Forbidden, PoolNotFound, ValidationFailed
from mnemos.layout import Layout
from mnemos.messages import JobInput, JobSpec, ModelRef, PoolSpec, PoolStatus, decode
from mnemos.names import Names
from tests.conftest import assert_eventually

pytestmark = pytest.mark.timeout(240)


def _pool(**overrides: Any) -> PoolSpec:
    fields: dict[str, Any] = dict(name="py", runtimes=["python"], min_workers=0, max_workers=2, worker_slots=2,
                                  scaledown_window_s=1.0)
    fields.update(overrides)
    return PoolSpec(**fields)


def _call(function: str, *args: Any, **extra: Any) -> JobSpec:
    return JobSpec(model=ModelRef(family="demo-fn", version="v1", runtime_config={"function": function}),
                   input=JobInput(args=list(args)), **extra)


@pytest.fixture
def state_dir(tmp_path: Path) -> Any:
    path = tmp_path / "autoscaler"
    yield path
    stop_local_workers(path, timeout=20.0)  # whatever a failed test left running


@pytest.fixture
async def start_autoscaler(
    nats_settings: NatsSettings, layout: Layout, state_dir: Path, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Autoscaler]]]:
    """Autoscalers on their own connections, with a local provider whose workers heartbeat
    every second and cache under the test's directory."""
    running: list[tuple[Autoscaler, Any]] = []
    environ = {**os.environ, "MNEMOS_WORKER_HEARTBEAT_INTERVAL_S": "1",
               "MNEMOS_WORKER_CACHE_DIR": str(tmp_path / "cache"), "MNEMOS_WORKER_DRAIN_TIMEOUT_S": "10"}

    async def start(name: str = "a1", **settings: Any) -> Autoscaler:
        conn = await nats.connect(nats_settings.servers, name=f"pytest-autoscaler-{name}")
        options: dict[str, Any] = dict(instance_id=name, metrics_port=0, lease_ttl_s=2.0, lease_renew_s=0.5,
                                       tick_s=0.1, state_dir=state_dir)
        options.update(settings)
        config = AutoscalerSettings(**options)
        scaler = Autoscaler(conn, nats_settings, config, provider_factory=lambda _name: LocalProvider(
            namespace=nats_settings.namespace, state_dir=state_dir, environ=environ))
        await scaler.start()
        running.append((scaler, conn))
        return scaler

    yield start
    for scaler, conn in reversed(running):
        try:
            await asyncio.wait_for(scaler.stop(), 20.0)
        except Exception:  # noqa: BLE001 - a test may have stopped it already
            pass
        await conn.close()


async def _status(layout: Layout, pool: str) -> PoolStatus | None:
    try:
        entry = await layout.autoscaler.get(Names.pool_status_key(pool))
    except Exception:  # noqa: BLE001 - not written yet
        return None
    return decode(entry.value or b"", PoolStatus)


async def test_pools_are_validated_stored_in_kv_and_listed(control_plane: Any, client: Any, layout: Layout,
                                                          demo_fn: Any) -> None:
    view = await client.set_pool(_pool(models=["demo-fn:v1"]))
    assert view.spec.models == ["demo-fn:v1"] and view.revision > 0
    entry = await layout.pools.get("py")  # what `nats kv get <ns>_pools py` shows
    assert decode(entry.value, PoolSpec).max_workers == 2
    assert [p.spec.name for p in await client.pools()] == ["py"]
    with pytest.raises(ValidationFailed):
        await client.set_pool(_pool(name="bad", min_workers=3, max_workers=1))
    with pytest.raises(Conflict):  # demo-fn:v1 already has its pool
        await client.set_pool(_pool(name="other", models=["demo-fn:v1"]))
    await client.set_pool(_pool(name="all-python"))  # every other python model: allowed
    with pytest.raises(Conflict):
        await client.set_pool(_pool(name="all-python-2"))
    with pytest.raises(Forbidden):
        await client.for_tenant("acme").set_pool(_pool(name="mine"))
    with pytest.raises(Conflict):  # its workers would be left to no provider: remove it first
        await client.set_pool(_pool(models=["demo-fn:v1"], provider="aws"))
    removed = await client.delete_pool("py")
    assert removed.spec.name == "py"
    with pytest.raises(PoolNotFound):
        await client.pool("py")


async def test_scale_from_zero_run_then_scale_down_to_zero(
    control_plane: Any, client: Any, demo_fn: Any, layout: Layout,
    start_autoscaler: Callable[..., Awaitable[Autoscaler]],
) -> None:
    await client.set_pool(_pool())
    scaler = await start_autoscaler()
    await assert_eventually(lambda: scaler.lease.held, message="lease taken")
    assert await client.workers() == []  # zero workers: min_workers 0

    record = await client.submit(_call("add", 2, 3))
    queued = await client.get(record.job_id)
    if queued.status == "queued":  # the job waits for a worker the autoscaler is starting
        assert queued.waiting is not None and queued.waiting.pool == "py", queued.waiting
    done = await client.wait(record.job_id, timeout=60)
    assert done.status == "completed" and done.output is not None and done.output.result == 5

    status = await assert_eventually(lambda: _status(layout, "py"), message="status written")
    ups = [d for d in status.decisions if d.action == "scale_up"]
    assert ups and "demand 1" in ups[0].reason and ups[0].outcome.startswith("started py-"), status.decisions
    workers = await client.workers()
    assert len(workers) == 1 and workers[0].tags.get("pool") == "py"

    # Idle after the job: after the 1 s window it is drained, deregisters and is stopped.
    async def scaled_to_zero() -> bool:
        st = await _status(layout, "py")
        return st is not None and st.ready == 0 and st.starting == 0 and st.draining == 0 and not st.workers

    await assert_eventually(scaled_to_zero, timeout=30, message="scaled down to zero")
    status = await _status(layout, "py")
    assert status is not None
    actions = [d.action for d in status.decisions]
    assert "scale_down" in actions and "remove" in actions, status.decisions
    down = next(d for d in status.decisions if d.action == "scale_down")
    assert "window" in down.reason and "draining" in down.outcome, down
    assert await client.workers() == []
    view = await client.pool("py")
    assert view.status is not None and view.status.decisions

    # The same in metrics: the leader, the pool's workers by state, one provisioning observed.
    import httpx

    assert scaler.metrics_server is not None
    async with httpx.AsyncClient() as http:
        text = (await http.get(scaler.metrics_server.url)).text
    assert "mnemos_autoscaler_leader 1.0" in text
    assert 'mnemos_pool_workers{pool="py",state="desired"} 0.0' in text
    assert 'mnemos_pool_provisioning_seconds_count{pool="py",provider="local"} 1.0' in text
    assert 'mnemos_pool_decisions_total{action="scale_up",pool="py"} 1.0' in text


async def test_a_busy_worker_is_never_drained_and_work_is_not_lost(
    control_plane: Any, client: Any, demo_fn: Any, layout: Layout,
    start_autoscaler: Callable[..., Awaitable[Autoscaler]],
) -> None:
    """Two workers up for a burst; then one long job keeps one worker busy past the window:
    only the idle one goes, the busy one finishes its job and is drained afterwards."""
    await client.set_pool(_pool(worker_slots=1, scaledown_window_s=0.5))
    await start_autoscaler()
    jobs = [await client.submit(_call("sleep", 0.2)) for _ in range(4)]
    for job in jobs:
        assert (await client.wait(job.job_id, timeout=60)).status == "completed"
    long = await client.submit(_call("sleep", 4.0))
    await assert_eventually(lambda: _running(client, long.job_id), timeout=30, message="long job running")
    holder = (await client.get(long.job_id)).worker_id

    async def one_left() -> bool:
        st = await _status(layout, "py")
        return st is not None and [w.worker_id for w in st.workers] == [holder]

    await assert_eventually(one_left, timeout=30, message="the idle worker drained, the busy one kept")
    done = await client.wait(long.job_id, timeout=60)
    assert done.status == "completed" and len(done.attempts) == 1 and done.attempts[0].outcome == "completed"
    status = await _status(layout, "py")
    assert status is not None
    for d in status.decisions:  # the busy worker was never asked to drain while it ran the job
        if d.action == "scale_down" and d.at < done.updated_at:
            assert holder not in d.outcome.split("draining ")[1].split(";")[0], d


async def _running(client: Any, job_id: str) -> bool:
    return bool((await client.get(job_id)).status == "running")


async def test_a_second_autoscaler_takes_over_without_starting_twice(
    control_plane: Any, client: Any, demo_fn: Any, layout: Layout,
    start_autoscaler: Callable[..., Awaitable[Autoscaler]], state_dir: Path,
) -> None:
    await client.set_pool(_pool(min_workers=1, max_workers=3, scaledown_window_s=60.0))
    first = await start_autoscaler("a1")
    second = await start_autoscaler("a2")
    await assert_eventually(lambda: first.lease.held, message="a1 leads")
    await assert_eventually(lambda: second.lease.seen_holder == "a1", message="a2 sees a1 holding the lease")
    assert not second.lease.held
    await assert_eventually(lambda: _ready(layout, 1), timeout=60, message="min_workers 1 ready")

    # The leader dies without a word (its lease simply stops being renewed).
    await first.supervisor.stop("lease")
    await first.supervisor.stop("loop")
    await assert_eventually(lambda: second.lease.held, timeout=15, message="a2 takes over")
    await assert_eventually(lambda: second.ticks > 5, message="a2 acting")
    status = await _status(layout, "py")
    assert status is not None and status.autoscaler == "a2" and len(status.workers) == 1
    provider = second.providers["local"]
    assert len((await provider.list(_pool())).workers) == 1  # not started again for the same need
    assert len(list((state_dir / "py").glob("*.json"))) == 1


async def _ready(layout: Layout, n: int) -> bool:
    st = await _status(layout, "py")
    return st is not None and st.ready == n


def test_policy_scales_up_at_once_and_down_to_what_the_window_needed() -> None:
    from datetime import UTC, datetime, timedelta

    from control_plane.autoscaler.policy import plan

    pool = _pool(max_workers=10, buffer_workers=1, scaledown_window_s=60)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    since = t0 - timedelta(hours=1)

    def at(s: float, demand: int, current: int, history: list[Any], watching: datetime = since) -> Any:
        return plan(pool, demand=demand, per_worker=2, current=current, now=t0 + timedelta(seconds=s),
                    history=history, watching_since=watching)

    up = at(0, 7, 0, [])
    assert (up.desired, up.change) == (5, 5)  # ceil(7/2) + 1 buffer, at once
    assert (at(0, 0, 0, []).desired, at(0, 0, 0, []).change) == (0, 0)  # no buffer without work: zero
    capped = at(0, 100, 10, [])
    assert capped.at_max and capped.change == 0 and capped.desired == 10
    busy = at(0, 8, 5, [])  # 8 jobs: 4 + 1 buffer = 5
    dip = at(10, 2, 5, busy.history)  # needs 2 now, but the window remembers 5
    assert dip.change == 0 and dip.desired == 5 and dip.need == 2
    mid = at(40, 4, 5, dip.history)  # needs 3
    assert mid.change == 0
    down = at(70, 0, 5, mid.history)  # 60 s after the last need of 5: the window's most is 3
    assert (down.change, down.desired) == (-2, 3), down.reason
    assert at(101, 0, 3, down.history).change == 0  # the need of 3 held until 70 s
    zero = at(131, 0, 3, down.history)  # 61 s after it ended
    assert (zero.change, zero.desired) == (-3, 0), zero.reason
    fresh = at(30, 0, 3, [], watching=t0)  # a new pool: it waits a whole window first
    assert fresh.change == 0 and "watched" in fresh.reason
    removed = plan(_pool(max_workers=0, scaledown_window_s=0), demand=5, per_worker=2, current=2, now=t0,
                   history=busy.history, watching_since=since)
    assert removed.change == -2  # a removed pool: no window to wait
    assert msgspec.json.encode(pool)  # the spec stays a plain message


async def test_a_pool_at_max_workers_says_so_and_its_jobs_say_why_they_wait(
    control_plane: Any, client: Any, demo_fn: Any, layout: Layout,
    start_autoscaler: Callable[..., Awaitable[Autoscaler]],
) -> None:
    await client.set_pool(_pool(max_workers=0))  # nothing may start: the backlog waits
    await start_autoscaler()
    jobs = [await client.submit(_call("noop")) for _ in range(3)]

    async def at_max() -> PoolStatus | None:
        st = await _status(layout, "py")
        return st if st is not None and st.at_max and st.messages == 3 else None

    status = await assert_eventually(at_max, timeout=30, message="the pool reports it is at max_workers")
    assert [d.action for d in status.decisions] == ["at_max"]
    assert "need more than max_workers 0" in status.decisions[0].reason
    waiting = (await client.get(jobs[0].job_id)).waiting
    assert waiting is not None and waiting.reason == "waiting_for_capacity" and waiting.pool == "py"
    assert "at max_workers" in waiting.detail, waiting.detail
    listed = await client.list(status=["queued"])
    assert {j.waiting.pool for j in listed.jobs if j.waiting is not None} == {"py"}


async def test_a_worker_that_stops_heartbeating_is_not_killed_at_once_and_comes_back(
    control_plane: Any, client: Any, demo_fn: Any, layout: Layout, state_dir: Path,
    start_autoscaler: Callable[..., Awaitable[Autoscaler]],
) -> None:
    """Its record expires (here: the process is stopped with SIGSTOP for longer than three
    heartbeats); the autoscaler records it as silent and leaves it running; once it
    heartbeats again it is ready again, the same process."""
    import json
    import signal

    await client.set_pool(_pool(min_workers=1, max_workers=1, scaledown_window_s=60.0))
    await start_autoscaler(silent_grace_s=120.0)
    await assert_eventually(lambda: _ready(layout, 1), timeout=60, message="one worker ready")
    (entry,) = list((state_dir / "py").glob("*.json"))
    worker = json.loads(entry.read_text())
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        async def silent() -> bool:
            st = await _status(layout, "py")
            return st is not None and any(d.action == "silent" for d in st.decisions)

        await assert_eventually(silent, timeout=30, message="the worker reported silent")
    finally:
        os.kill(worker["pid"], signal.SIGCONT)

    async def back() -> bool:
        st = await _status(layout, "py")
        return st is not None and [(w.worker_id, w.state) for w in st.workers] == [(worker["worker_id"], "ready")]

    await assert_eventually(back, timeout=30, message="the same worker ready again, and no other started")
    assert entry.exists() and json.loads(entry.read_text())["pid"] == worker["pid"]


async def test_a_clean_stop_gives_the_lease_up_at_once(
    control_plane: Any, client: Any, layout: Layout, start_autoscaler: Callable[..., Awaitable[Autoscaler]],
) -> None:
    from nats.js.errors import KeyDeletedError, KeyNotFoundError

    first = await start_autoscaler("a1")
    await assert_eventually(lambda: first.lease.held, message="a1 leads")
    await first.stop()
    with pytest.raises((KeyDeletedError, KeyNotFoundError)):  # deleted, not left to expire
        await layout.autoscaler.get(Names.AUTOSCALER_LEASE_KEY)
    second = await start_autoscaler("a2")
    await assert_eventually(lambda: second.lease.held, timeout=15, message="a2 takes the free lease")


def test_a_dispatch_subject_names_its_pool_back() -> None:
    """What the autoscaler counts per pool comes from the subjects names.py builds."""
    from mnemos.pools import pool_for

    n = Names("ns")
    subject = n.dispatch_subject("transformers", 7, "llama", "3.1-8b")
    assert Names.parse_dispatch_model(subject) == ("transformers", 7, "llama:3.1-8b")
    pools = [_pool(name="all", runtimes=["transformers"]),
             _pool(name="llama", runtimes=["transformers"], models=["llama:3.1-8b"])]
    assert pool_for(pools, "transformers", "llama:3.1-8b").name == "llama"  # the one naming it
    assert pool_for(pools, "transformers", "gpt2:v1").name == "all"
    assert pool_for(pools, "python", "gpt2:v1") is None
    with pytest.raises(ValueError):
        Names.parse_dispatch_model("ns.results.01ABC")
