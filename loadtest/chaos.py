"""Chaos runs: jobs under faults, and a summary of what was lost or done twice.

    python -m loadtest chaos --jobs 5000 --workers 3 --kill-every 2
    python -m loadtest chaos --jobs 5000 --workers 3 --kill-every 2 --kill-control-plane
    python -m loadtest chaos --jobs 5000 --workers 3 --cluster --kill-nats-node
    python -m loadtest chaos --jobs 5000 --workers 3 --cluster --kill-nats-node --kill-control-plane
    python -m loadtest chaos --jobs 5000 --workers 3 --cluster --kill-nats-node for-good
    python -m loadtest chaos --jobs 5000 --workers 3 --cluster --kill-nats-node leader

The run starts its own stack (file-backed JetStream: one node, or a 3-node cluster on
loopback with R3 buckets and streams), a control plane and ``--workers`` worker processes
(python runtime), and submits ``--jobs`` jobs of the demo function ``sleep`` (a few ms to
``--max-job-ms``) at ``--rate`` per second with idempotency keys, retrying a submission that failed (as a client
must) with the same key. Meanwhile a worker is SIGKILLed every ``--kill-every`` seconds
and replaced, and optionally the control plane or one NATS node is killed and restarted.

``--kill-nats-node`` kills one node (a random one) and restarts it 3 s later; ``for-good``
never restarts it; ``leader`` kills the node leading the dispatch stream. With
``--kill-control-plane`` too, the control plane is killed and restarted while that node is
down.

The client follows every job's final message on ``mnemos.results.>``; at the end each
record is read back (retried for up to a minute while the cluster recovers). *lost*:
accepted jobs whose record is not terminal by the deadline, or is gone: the platform lost
them. *untracked*: jobs whose record this load generator could not read at all (it lost
track; the platform may not have). Every job in either list is named. *duplicated*: jobs
whose record shows more than one completed attempt or that announced more than one
terminal result. *re-executed*: jobs that needed more than one attempt (expected when
workers die: execution is at-least-once). The run's logs are kept (and their directory
printed) when anything was lost, untracked or duplicated.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js import api as jsapi

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.embedded import EmbeddedNats, die_with_parent, free_port
from mnemos.errors import MnemosError
from mnemos.messages import TERMINAL_STATUSES, Dispatch, ResultFinal, decode, decode_result

__all__ = ["ChaosOptions", "ChaosResult", "run_chaos"]


@dataclass
class ChaosOptions:
    jobs: int = 5000
    workers: int = 3
    slots: int = 16
    kill_every: float = 2.0
    kill_control_plane: bool = False
    cluster: bool = False
    #: "" (none), "restart" (3 s later), "for-good" or "leader" (of the dispatch stream, restarted).
    kill_nats_node: str = ""
    max_job_ms: float = 20.0
    #: Submissions per second, so that faults hit while jobs are still arriving.
    rate: float = 500.0
    window: int = 256
    deadline_s: float = 300.0
    heartbeat_s: float = 1.0
    ack_wait_s: float = 5.0
    seed: int = 7
    quiet: bool = False
    #: The children's log level (their logs are kept when a run is not clean).
    log_level: str = "WARNING"


@dataclass
class ChaosResult:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    untracked: int = 0
    duplicated: int = 0
    reexecuted: int = 0
    worker_kills: int = 0
    control_plane_kills: int = 0
    nats_kills: int = 0
    submit_retries: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Every job that did not end: job id, status, attempt outcomes (or why it is unreadable).
    stuck: list[str] = field(default_factory=list)
    #: Where the run's logs are, when they were kept.
    logs: str = ""

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.untracked == 0 and self.duplicated == 0

    def summary(self) -> str:
        p = statistics.quantiles(self.latencies_ms, n=100) if len(self.latencies_ms) > 1 else [0.0] * 99
        return (
            f"submitted {self.submitted} / completed {self.completed} / failed {self.failed} / "
            f"lost {self.lost} / untracked {self.untracked} / duplicated {self.duplicated} / "
            f"p50 {p[49]:.0f} ms / p99 {p[98]:.0f} ms\n"
            f"  re-executed {self.reexecuted}, worker kills {self.worker_kills}, control-plane kills "
            f"{self.control_plane_kills}, nats node kills {self.nats_kills}, submit retries "
            f"{self.submit_retries}, {self.elapsed_s:.1f} s"
            + "".join(f"\n  not terminal: {s}" for s in self.stuck)
            + (f"\n  logs kept in {self.logs}" if self.logs else "")
        )


class _Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class _Stack:
    """NATS (one node or three), a control plane and workers, all killable."""

    def __init__(self, o: ChaosOptions, root: Path) -> None:
        self.o = o
        self.root = root
        self.nodes: list[EmbeddedNats] = []
        if o.cluster:
            routes = [free_port() for _ in range(3)]
            for i in range(3):
                self.nodes.append(EmbeddedNats(
                    store_dir=root / f"nats-{i}", port=free_port(), server_name=f"n{i}", cluster_name="chaos",
                    cluster_port=routes[i], routes=routes, log_file=root / f"nats-{i}.log"))
        else:
            self.nodes.append(EmbeddedNats(store_dir=root / "nats", port=free_port(), log_file=root / "nats.log"))
        url = ",".join(n.url for n in self.nodes)
        self.settings = NatsSettings(nats_url=url, namespace="chaos", replicas=3 if o.cluster else 1)
        self.env = dict(os.environ, MNEMOS_NATS_URL=url, MNEMOS_NAMESPACE="chaos",
                        MNEMOS_REPLICAS=str(self.settings.replicas), MNEMOS_LOG_LEVEL=o.log_level,
                        MNEMOS_WORKER_RUNTIMES="python", MNEMOS_WORKER_MAX_CONCURRENT_JOBS=str(o.slots),
                        MNEMOS_WORKER_HEARTBEAT_INTERVAL_S=str(o.heartbeat_s),
                        MNEMOS_WORKER_ACK_WAIT_S=str(o.ack_wait_s), MNEMOS_WORKER_DRAIN_TIMEOUT_S="5",
                        # Several processes on one host: each takes a free metrics port (and
                        # advertises it in its record), so none collides with another or
                        # with a `mnemos up` running beside.
                        MNEMOS_CP_METRICS_PORT="0", MNEMOS_WORKER_METRICS_PORT="0")
        self.cp = _Proc("control-plane", [sys.executable, "-m", "launchers", "control-plane"], self.env,
                        root / "control-plane.log")
        self.workers: list[_Proc] = []
        self._n = 0

    def new_worker(self) -> _Proc:
        self._n += 1
        env = dict(self.env, MNEMOS_WORKER_ID=f"chaos-w{self._n}",
                   MNEMOS_WORKER_CACHE_DIR=str(self.root / "cache" / f"w{self._n}"))
        proc = _Proc(f"worker-{self._n}", [sys.executable, "-m", "launchers", "worker"], env,
                     self.root / f"worker-{self._n}.log")
        proc.start()
        return proc

    async def start(self) -> None:
        for node in self.nodes:
            node.start()  # in this thread: children die with the thread that forked them
        await _wait_jetstream(self.settings)
        await _register_functions(self.settings, self.root)
        self.cp.start()
        self.workers = [self.new_worker() for _ in range(self.o.workers)]
        client = await Client.connect(self.settings)
        try:
            deadline = time.monotonic() + 120
            while len(await _safe_workers(client)) < self.o.workers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers did not come up; logs in {self.root}")
                await asyncio.sleep(0.2)
        finally:
            await client.close()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.cp.stop()
        for node in self.nodes:
            node.stop()


async def _safe_workers(client: Client) -> list[Any]:
    try:
        return await client.workers()
    except MnemosError:
        return []


async def _wait_jetstream(settings: NatsSettings) -> None:
    nc = await nats.connect(settings.servers)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


async def _register_functions(settings: NatsSettings, root: Path) -> None:
    from mnemos.layout import LayoutOptions, ensure_layout
    from registry import Registry, RegistrySettings
    from registry.demo import build_demo_functions

    nc = await nats.connect(settings.servers)
    try:
        await ensure_layout(nc.jetstream(), settings.names, LayoutOptions(replicas=settings.replicas))
        registry = Registry(nc.jetstream(), settings.names, RegistrySettings(), replicas=settings.replicas)
        await registry.push(build_demo_functions(root / "fn"), family="demo-fn", version="v1", runtime="python",
                            runtime_config={"entrypoint": "functions.py:sleep"})
    finally:
        await nc.close()


async def run_chaos(o: ChaosOptions) -> ChaosResult:
    """Run one chaos scenario and return its summary."""
    rng = random.Random(o.seed)
    result = ChaosResult()
    root = Path(tempfile.mkdtemp(prefix="mnemos-chaos-"))
    stack = _Stack(o, root)
    ok = False
    try:
        await stack.start()
        await _drive(stack, o, rng, result)
        ok = result.clean
    finally:
        await asyncio.to_thread(stack.stop)
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            result.logs = str(root)
    return result


async def _drive(stack: _Stack, o: ChaosOptions, rng: random.Random, result: ChaosResult) -> None:
    settings = stack.settings
    client = await Client.connect(settings, request_timeout=5)
    nc = client.nc
    finals: dict[str, list[str]] = {}
    progress = asyncio.Event()
    done_at: dict[str, float] = {}
    submitted_at: dict[str, float] = {}

    async def on_result(msg: Any) -> None:
        item = decode_result(msg.data)
        if isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
            finals.setdefault(item.job_id, []).append(item.status)
            done_at.setdefault(item.job_id, time.monotonic())
            progress.set()

    sub = await nc.jetstream().subscribe(settings.names.results_all, cb=on_result, ordered_consumer=True,
                                         config=jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.NEW))
    stop_chaos = asyncio.Event()
    chaos = asyncio.create_task(_chaos(stack, o, rng, result, stop_chaos))
    t0 = time.monotonic()
    sem = asyncio.Semaphore(o.window)
    job_ids: list[str] = []

    async def submit(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / o.rate - time.monotonic()))
        spec = job_spec("demo-fn:v1", args=[rng.uniform(0, o.max_job_ms) / 1000.0], idempotency_key=f"chaos-{i}",
                        timeout_seconds=60)
        async with sem:
            delay = 0.05
            while True:
                try:
                    record = await client.submit(spec)
                    break
                except MnemosError as e:
                    if not e.retryable and e.code not in ("not_connected",):
                        raise
                    result.submit_retries += 1
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            submitted_at.setdefault(record.job_id, time.monotonic())
            job_ids.append(record.job_id)

    await asyncio.gather(*(submit(i) for i in range(o.jobs)))
    unique = set(job_ids)
    result.submitted = len(unique)
    deadline = t0 + o.deadline_s
    while time.monotonic() < deadline and not unique.issubset(finals):
        progress.clear()
        try:
            await asyncio.wait_for(progress.wait(), timeout=1.0)
        except TimeoutError:
            pass
    stop_chaos.set()
    await chaos
    await sub.unsubscribe()
    # Read every record back (the authority), tolerant of a recovering cluster.
    records = await asyncio.gather(*(_get(client, j) for j in sorted(unique)))
    for job_id, record in zip(sorted(unique), records, strict=True):
        if isinstance(record, str):  # never readable: lost by the platform, or by this client?
            if record == "job_not_found":
                result.lost += 1
                result.stuck.append(f"{job_id} record gone (accepted, then lost)")
            else:
                result.untracked += 1
                result.stuck.append(f"{job_id} unreadable by the load generator: {record}")
            continue
        if not record.terminal:
            result.lost += 1
            result.stuck.append(f"{record.job_id} {record.status} dispatch=g{record.dispatch} "
                                f"worker={record.worker_id} attempts={[a.outcome for a in record.attempts]}")
            continue
        if record.status == "completed":
            result.completed += 1
        else:
            result.failed += 1
        completed_attempts = sum(1 for a in record.attempts if a.outcome == "completed")
        if completed_attempts > 1 or len(finals.get(record.job_id, [])) > 1:
            result.duplicated += 1
        if len(record.attempts) > 1:
            result.reexecuted += 1
        if record.job_id in done_at:
            result.latencies_ms.append((done_at[record.job_id] - submitted_at[record.job_id]) * 1000.0)
    result.elapsed_s = time.monotonic() - t0
    if result.stuck:
        result.stuck += await _where_messages_are(client, stack)
    await client.close()


async def _where_messages_are(client: Client, stack: _Stack) -> list[str]:
    """For a run that left jobs behind: what the dispatch stream and its consumers hold."""
    names = stack.settings.names
    js = client.nc.jetstream()
    lines: list[str] = []
    try:
        info = await js.stream_info(names.dispatch_stream)
        lines.append(f"dispatch stream: {info.state.messages} messages, seq {info.state.first_seq}-"
                     f"{info.state.last_seq}, leader {info.cluster.leader if info.cluster else '-'}")
        for c in await js.consumers_info(names.dispatch_stream):
            if c.num_pending or c.num_ack_pending or c.num_redelivered:
                lines.append(f"consumer {c.name}: pending {c.num_pending}, ack pending {c.num_ack_pending}, "
                             f"redelivered {c.num_redelivered}, waiting {c.num_waiting}, "
                             f"delivered {c.delivered.stream_seq if c.delivered else '-'}, "
                             f"ack floor {c.ack_floor.stream_seq if c.ack_floor else '-'}")
        for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages <= 1000 else ():
            try:
                msg = await js.get_msg(names.dispatch_stream, seq)
            except Exception:  # noqa: BLE001 - deleted (acked) sequences
                continue
            try:
                dispatch = decode(msg.data or b"", Dispatch)
                lines.append(f"message {seq} ({msg.subject}): job {dispatch.record.job_id} "
                             f"g{dispatch.record.dispatch} rev {dispatch.revision}")
            except Exception as e:  # noqa: BLE001
                lines.append(f"message {seq} ({msg.subject}): unreadable: {e}")
    except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the result
        lines.append(f"could not read the dispatch stream: {e!r}")
    return lines


async def _get(client: Client, job_id: str) -> Any:
    """The record, or the last error code after a minute of retries."""
    code = "no answer"
    for _ in range(120):
        try:
            return await client.get(job_id)
        except MnemosError as e:
            code = e.code
            if code == "job_not_found":
                return code
            await asyncio.sleep(0.5)
    return code


async def _chaos(stack: _Stack, o: ChaosOptions, rng: random.Random, result: ChaosResult, stop: asyncio.Event) -> None:
    started = time.monotonic()
    cp_done = not o.kill_control_plane
    nats_done = not o.kill_nats_node
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=o.kill_every)
            return
        except TimeoutError:
            pass
        if o.kill_every > 0 and stack.workers:
            victim = stack.workers.pop(rng.randrange(len(stack.workers)))
            await asyncio.to_thread(victim.kill)
            stack.workers.append(stack.new_worker())
            result.worker_kills += 1
            _say(o, f"[{time.monotonic() - started:5.1f}s] SIGKILL {victim.name}, started a replacement")
        if not cp_done and nats_done and time.monotonic() - started > 2 * o.kill_every:
            cp_done = True
            await _kill_control_plane(stack, result, o, started)
        if not nats_done and time.monotonic() - started > 2 * o.kill_every:
            nats_done = True
            if o.kill_nats_node == "leader":
                node = await _dispatch_leader(stack)
            else:
                node = stack.nodes[rng.randrange(len(stack.nodes))]
            await asyncio.to_thread(node.kill)
            result.nats_kills += 1
            _say(o, f"[{time.monotonic() - started:5.1f}s] SIGKILL nats node {node.server_name}"
                    f"{' (the dispatch stream leader)' if o.kill_nats_node == 'leader' else ''}")
            if not cp_done:  # the control plane dies and comes back while the node is down
                cp_done = True
                await _kill_control_plane(stack, result, o, started)
            if o.kill_nats_node == "for-good":
                _say(o, f"[{time.monotonic() - started:5.1f}s] nats node {node.server_name} stays down")
                continue
            await asyncio.sleep(3.0)
            node.start()  # in this thread: children die with the thread that forked them
            _say(o, f"[{time.monotonic() - started:5.1f}s] nats node {node.server_name} restarted")


async def _kill_control_plane(stack: _Stack, result: ChaosResult, o: ChaosOptions, started: float) -> None:
    await asyncio.to_thread(stack.cp.kill)
    result.control_plane_kills += 1
    _say(o, f"[{time.monotonic() - started:5.1f}s] SIGKILL control plane")
    await asyncio.sleep(1.0)
    stack.cp.start()
    _say(o, f"[{time.monotonic() - started:5.1f}s] control plane restarted")


async def _dispatch_leader(stack: _Stack) -> EmbeddedNats:
    """The node that leads the dispatch stream now."""
    nc = await nats.connect(stack.settings.servers)
    try:
        info = await nc.jetstream().stream_info(stack.settings.names.dispatch_stream)
    finally:
        await nc.close()
    leader = info.cluster.leader if info.cluster is not None else None
    return next(n for n in stack.nodes if n.server_name == leader)


def _say(o: ChaosOptions, text: str) -> None:
    if not o.quiet:
        print(text, flush=True)
