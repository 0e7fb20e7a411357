"""Autoscaler benchmarks: ``bench coldstart`` and ``bench burst`` (numbers, a plot; no asserts).

``coldstart``: the pool ``local`` at zero workers, one streamed job for the demo model;
the time to its first token at the client, broken down: the autoscaler's decision, the
provider's start (a fork from the zygote), the process from start to ready, the claim,
the model load, the generation of the first token. A second job on the now-warm worker
loads nothing. ``--no-zygote`` starts a fresh process per worker instead, to compare.

``burst``: a step load up and down (``--steps`` times) on the local provider: the reaction
time to scale up, queue wait p50/p99 per step, and after every scale-down: lost,
duplicated and interrupted jobs (all must be 0). A PNG (matplotlib) of queue depth,
workers (desired, ready, draining) and p99 latency over time is written next to the JSON
numbers. ``--kill-autoscaler``: a standby autoscaler runs beside the stack's, and the
acting one is SIGKILLed mid-burst: the standby takes over; the run reports when, whether
any worker was started beyond what was needed, and whether any was left running unused
past the window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from launchers.up import LOCAL_POOL, LocalStack
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.errors import MnemosError
from mnemos.messages import PoolSpec, PoolStatus, ResultChunk, WorkerRecord, decode
from mnemos.names import Names

__all__ = ["ColdstartOptions", "BurstOptions", "bench_coldstart", "bench_burst"]


def _ts(d: datetime | None) -> float:
    return d.timestamp() if d is not None else float("nan")


async def _status(client: Client) -> PoolStatus | None:
    try:
        return (await client.pool(LOCAL_POOL)).status
    except MnemosError:
        return None


async def _set_pool(client: Client, **changes: Any) -> PoolSpec:
    import msgspec

    spec = msgspec.structs.replace((await client.pool(LOCAL_POOL)).spec, **changes)
    await client.set_pool(spec)
    return spec


async def _until(probe: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(every)


async def _at_zero(client: Client) -> bool:
    st = await _status(client)
    return bool(st is not None and not st.workers and not await client.workers())


# ---------------------------------------------------------------------------- coldstart

async def _first_token(client: Client, spec: Any) -> tuple[str, float]:
    """Submit a job and follow it to its end: (its id, the wall time its first chunk arrived)."""
    job_id = (await client.submit(spec)).job_id
    first: float | None = None
    async for item in client.stream(job_id):
        if isinstance(item, ResultChunk) and first is None:
            first = time.time()
    return job_id, first if first is not None else float("nan")


@dataclass
class ColdstartOptions:
    runs: int = 3
    max_tokens: int = 8
    prompt: str = "hello"


async def bench_coldstart(settings: NatsSettings, o: ColdstartOptions) -> dict[str, Any]:
    client = await Client.connect(settings, request_timeout=30)
    names = settings.names
    ready_at: dict[str, float] = {}

    async def on_record(msg: Any) -> None:
        try:
            rec = decode(msg.data, WorkerRecord)
        except MnemosError:
            return
        if rec.status == "idle" and rec.worker_id not in ready_at:
            ready_at[rec.worker_id] = rec.last_heartbeat.timestamp()

    sub = await client.nc.subscribe(names.heartbeat_all, cb=on_record)
    runs: list[dict[str, float]] = []
    try:
        await _set_pool(client, min_workers=0, max_workers=1, scaledown_window_s=0.5)
        await _until(lambda: _status(client), 60, "the autoscaler acting on the pool")
        for i in range(o.runs):
            await _until(lambda: _at_zero(client), 60, "the pool at zero workers")
            await asyncio.sleep(0.5)  # the autoscaler idle at zero, its zygote waiting
            spec = job_spec("demo-gpt2:v1", prompt=o.prompt, max_tokens=o.max_tokens, temperature=0)
            submitted = time.time()
            job_id, first = await _first_token(client, spec)
            record = await client.get(job_id)
            st = await _status(client)
            assert st is not None and record.worker_id is not None
            worker = next((w for w in st.workers if w.worker_id == record.worker_id), None)
            asked = _ts(worker.started_at) if worker is not None else float("nan")
            provider = (worker.provider_start_s or 0.0) if worker is not None else float("nan")
            ready = ready_at.get(record.worker_id, float("nan"))
            claimed = _ts(record.attempts[0].started_at) if record.attempts else float("nan")
            load = (record.timings.load_ms or 0.0) / 1000.0
            total = first - submitted
            run = {
                "decision_s": asked - submitted,
                "provider_start_s": provider,
                "process_start_to_ready_s": ready - asked - provider,
                "claim_s": claimed - ready,
                "model_load_s": load,
                "first_token_s": first - claimed - load,
                "total_to_first_token_s": total,
            }
            # The same worker, warm: nothing to load.
            t = time.time()
            warm_id, warm_first = await _first_token(client, spec)
            warm = await client.get(warm_id)
            run["warm_total_to_first_token_s"] = warm_first - t
            run["warm_load_s"] = (warm.timings.load_ms or 0.0) / 1000.0
            run["warm_cache_hit"] = float(bool(warm.timings.cache_hit and warm.worker_id == record.worker_id))
            runs.append(run)
            print(f"run {i + 1}: first token {total:.3f}s = decision {run['decision_s']:.3f} + provider "
                  f"{provider:.3f} + process start->ready {run['process_start_to_ready_s']:.3f} + claim "
                  f"{run['claim_s']:.3f} + model load {load:.3f} + first token {run['first_token_s']:.3f}; "
                  f"warm: {run['warm_total_to_first_token_s']:.3f}s, load {run['warm_load_s']:.3f}s "
                  f"(memory cache hit: {bool(run['warm_cache_hit'])})", flush=True)
    finally:
        await sub.unsubscribe()
        await client.close()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in median.items()))
    return {"runs": runs, "median": median}


# ---------------------------------------------------------------------------- burst


@dataclass
class BurstOptions:
    steps: int = 5
    high_s: float = 8.0
    #: Submissions per second while the step is up.
    rate: float = 24.0
    job_s: float = 0.25
    max_workers: int = 4
    slots: int = 2
    window_s: float = 3.0
    #: Quiet time after each step (the window, the drain, some margin).
    low_s: float = 7.0
    kill_autoscaler: bool = False
    out: Path = Path("burst")


@dataclass
class _Sample:
    t: float
    messages: int
    desired: int
    ready: int
    starting: int
    draining: int
    busy: int
    autoscaler: str
    p99_ms: float | None


@dataclass
class _Step:
    start: float
    end: float
    jobs: list[dict[str, Any]] = field(default_factory=list)


async def bench_burst(settings: NatsSettings, stack: LocalStack, o: BurstOptions) -> dict[str, Any]:
    client = await Client.connect(settings, request_timeout=60)
    samples: list[_Sample] = []
    seen_decisions: dict[tuple[Any, str, str], Any] = {}
    finished: list[tuple[float, float]] = []  # (done at, latency ms)
    steps: list[_Step] = []
    standby: subprocess.Popen[bytes] | None = None
    killed_at: float | None = None
    t0 = time.time()
    stop = asyncio.Event()
    try:
        await _set_pool(client, min_workers=0, max_workers=o.max_workers, worker_slots=o.slots,
                        scaledown_window_s=o.window_s)
        await _until(lambda: _at_zero(client), 90, "the pool at zero workers")
        if o.kill_autoscaler:
            standby = _start_standby(stack)
            await asyncio.sleep(3.0)  # it is up and waiting for the lease

        async def sampler() -> None:
            while not stop.is_set():
                st = await _status(client)
                now = time.time()
                recent = [ms for done, ms in finished if now - 1.0 <= done <= now]
                p99 = statistics.quantiles(recent, n=100, method="inclusive")[98] if len(recent) >= 2 else (
                    recent[0] if recent else None)
                if st is not None:
                    for d in st.decisions:  # the status keeps the latest few: collect them all
                        seen_decisions[(d.at, d.action, d.outcome)] = d
                    samples.append(_Sample(now - t0, st.messages, st.desired, st.ready, st.starting, st.draining,
                                           st.busy, st.autoscaler, p99))
                await asyncio.sleep(0.25)

        async def one(step: _Step) -> None:
            spec = job_spec("demo-fn:v1", function="sleep", args=[o.job_s], timeout_seconds=120)
            sent = time.time()
            try:
                rec = await client.run(spec, timeout=180)
            except MnemosError as e:
                step.jobs.append({"status": f"error {e.code}", "attempts": [], "queue_ms": None, "error": e.message})
                return
            done = time.time()
            finished.append((done, (done - sent) * 1000.0))
            step.jobs.append({"status": rec.status, "attempts": [a.outcome for a in rec.attempts],
                              "queue_ms": rec.timings.queue_ms, "job_id": rec.job_id,
                              "error": rec.error.message if rec.error else None,
                              "attempt_errors": [f"{a.worker_id}: {a.error.code}: {a.error.message}"
                                                 for a in rec.attempts if a.error is not None]})

        sampling = asyncio.create_task(sampler())
        pending: set[asyncio.Task[None]] = set()
        for i in range(o.steps):
            step = _Step(start=time.time(), end=0.0)
            steps.append(step)
            n = int(o.high_s * o.rate)
            for k in range(n):
                pending.add(asyncio.create_task(one(step)))
                if o.kill_autoscaler and i == 1 and k == n // 2 and killed_at is None:
                    killed_at = time.time()
                    _kill_leader(stack)
                await asyncio.sleep(1.0 / o.rate)
            step.end = time.time()
            await asyncio.sleep(o.low_s)
        await asyncio.gather(*pending)
        await asyncio.sleep(1.0)
        stop.set()
        await sampling
        decisions = sorted(seen_decisions.values(), key=lambda d: d.at)
    finally:
        await client.close()
        if standby is not None:
            standby.send_signal(signal.SIGTERM)
            try:
                standby.wait(30)
            except subprocess.TimeoutExpired:
                standby.kill()
    return _report(o, t0, steps, samples, decisions, killed_at)


def _start_standby(stack: LocalStack) -> subprocess.Popen[bytes]:
    """A second ``mnemos autoscaler`` with the same settings as the stack's (it waits)."""
    (child,) = [c for c in stack.children if c.name == "autoscaler"]
    env = {**child.env, "MNEMOS_AUTOSCALER_INSTANCE_ID": "standby"}
    out = open(stack.logs / "autoscaler-standby.log", "ab")  # noqa: SIM115 - the child's
    return subprocess.Popen([sys.executable, "-m", "launchers", "autoscaler"], env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_leader(stack: LocalStack) -> None:
    (child,) = [c for c in stack.children if c.name == "autoscaler"]
    assert child.proc is not None
    os.killpg(child.proc.pid, signal.SIGKILL)
    print(f"  SIGKILLed the acting autoscaler (pid {child.proc.pid}) mid-burst", flush=True)


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _report(o: BurstOptions, t0: float, steps: list[_Step], samples: list[_Sample], decisions: list[Any],
            killed_at: float | None) -> dict[str, Any]:
    ups = sorted(_ts(d.at) for d in decisions if d.action == "scale_up" and d.outcome.startswith("started"))
    out_steps = []
    for i, step in enumerate(steps):
        jobs = step.jobs
        waits = [j["queue_ms"] for j in jobs if j["queue_ms"] is not None]
        reaction = next((u - step.start for u in ups if u >= step.start - 0.05), None)
        after = [s for s in samples if step.end + o.low_s - 0.75 <= s.t + t0 <= step.end + o.low_s]
        out_steps.append({
            "step": i + 1,
            "jobs": len(jobs),
            "reaction_to_scale_up_s": None if reaction is None else round(reaction, 3),
            "peak_ready": max((s.ready for s in samples if step.start <= s.t + t0 <= step.end + o.low_s), default=0),
            "queue_wait_p50_ms": _pct(waits, 50),
            "queue_wait_p99_ms": _pct(waits, 99),
            "lost": sum(1 for j in jobs if j["status"] != "completed"),
            "duplicated": sum(1 for j in jobs if j["attempts"].count("completed") > 1),
            "interrupted": sum(1 for j in jobs if any(a != "completed" for a in j["attempts"])),
            "not_clean": [j for j in jobs if j["status"] != "completed" or j["attempts"] != ["completed"]][:10],
            "ready_at_end_of_quiet": after[-1].ready if after else None,
        })
    leaders: list[tuple[float, str]] = []
    for s in samples:
        if not leaders or leaders[-1][1] != s.autoscaler:
            leaders.append((round(s.t, 2), s.autoscaler))
    # Workers beyond what the window asked for: a worker started twice for one need (say,
    # by a new leader that did not know of the old one's) shows here.
    overshoot = 0
    for s in samples:
        wanted = max(x.desired for x in samples if s.t - o.window_s - 1.0 <= x.t <= s.t)
        overshoot = max(overshoot, s.ready + s.starting - wanted)
    result: dict[str, Any] = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
        "steps": out_steps,
        "lost": sum(row["lost"] for row in out_steps),
        "duplicated": sum(row["duplicated"] for row in out_steps),
        "interrupted": sum(row["interrupted"] for row in out_steps),
        "max_workers_seen": max((s.ready + s.starting + s.draining for s in samples), default=0),
        "workers_beyond_desired": max(0, overshoot),
        "left_running_past_window": sum(1 for row in out_steps if row["ready_at_end_of_quiet"]),
        "leaders": leaders,
    }
    if killed_at is not None:
        takeover = next((t for t, who in leaders if who == "standby"), None)
        result["autoscaler_killed_at_s"] = round(killed_at - t0, 2)
        result["standby_acting_at_s"] = takeover
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _plot(o.out.with_suffix(".png"), samples, steps, t0, killed_at)
    for row in out_steps:
        print(f"step {row['step']}: {row['jobs']} jobs, scale-up reaction {row['reaction_to_scale_up_s']}s, "
              f"peak ready {row['peak_ready']}, queue wait p50 {row['queue_wait_p50_ms']} ms p99 "
              f"{row['queue_wait_p99_ms']} ms; lost {row['lost']} duplicated {row['duplicated']} interrupted "
              f"{row['interrupted']}; ready after the quiet {row['ready_at_end_of_quiet']}", flush=True)
    print(f"lost {result['lost']} / duplicated {result['duplicated']} / interrupted {result['interrupted']}; "
          f"most workers at once {result['max_workers_seen']} (max {o.max_workers}); beyond desired "
          f"{result['workers_beyond_desired']}; left running past the window {result['left_running_past_window']}; "
          f"leaders {leaders}", flush=True)
    print(f"wrote {o.out.with_suffix('.json')} and {o.out.with_suffix('.png')}", flush=True)
    return result


def _plot(path: Path, samples: list[_Sample], steps: list[_Step], t0: float, killed_at: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(10, 7))
    ax1.plot(t, [s.messages for s in samples], label="jobs held (queued + running)")
    ax1.set_ylabel("queue")
    ax2.step(t, [s.desired for s in samples], where="post", label="desired")
    ax2.step(t, [s.ready for s in samples], where="post", label="ready")
    ax2.step(t, [s.draining for s in samples], where="post", label="draining")
    ax2.step(t, [s.starting for s in samples], where="post", label="starting", linestyle=":")
    ax2.set_ylabel("workers")
    ax3.plot(t, [s.p99_ms if s.p99_ms is not None else float("nan") for s in samples], label="p99 (last 1 s)")
    ax3.set_ylabel("latency ms")
    ax3.set_xlabel("seconds")
    for ax in (ax1, ax2, ax3):
        for step in steps:
            ax.axvspan(step.start - t0, step.end - t0, color="tab:orange", alpha=0.08)
        if killed_at is not None:
            ax.axvline(killed_at - t0, color="red", linestyle="--", label="autoscaler killed" if ax is ax1 else None)
        ax.legend(loc="upper right", fontsize="small")
    fig.suptitle("mnemos bench burst: step load on the local provider")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: The pool status key, for readers of the JSON (``nats kv get <ns>_autoscaler status.local``).
STATUS_KEY = Names.pool_status_key(LOCAL_POOL)
