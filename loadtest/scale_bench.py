"""``bench scale``: how the platform's costs grow with the number of queued jobs.

For each size N, on a fresh local stack started with no worker:

1. **submit**: N no-op jobs (``demo-fn:v1`` function ``noop``, ``jobs.submit``) from one
   client connection, at most ``window`` requests outstanding -> jobs/s. Nothing takes
   them: all N stay queued.
2. **list**: with all N queued and the control plane's index caught up, ``jobs.list``
   first pages (50 jobs) -> p50/p95 ms, unfiltered and with ``status=queued``.
3. **memory and storage** with all N queued: RSS of nats-server and the control plane, the
   control plane's CPU use while idle (its reaper sweeps the waiting jobs), and the bytes
   of the dispatch stream, the jobs KV stream and the results stream per job.
4. **index reload** (``restart_control_plane``): the control plane is stopped and started
   again; the time until ``jobs.list`` answers with the newest job (its index replays the
   whole jobs bucket at start).
5. **drain**: one worker (``slots``) is started the way ``LocalStack`` starts its workers;
   from its registration until the dispatch stream is empty -> jobs/s. The worker's own
   count says how many completed. Then memory (worker too) and storage again.

The load generator keeps counters, never per-job records, so it stays small at 10^6; it
prints progress to stderr every ``progress_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from launchers.up import LocalStack
from loadtest.bench import local_stack, percentiles
from mnemos.client import Client, job_spec
from mnemos.errors import MnemosError
from mnemos.messages import WorkerCommand, WorkerRecord, decode, encode
from mnemos.names import Names

__all__ = ["ScaleOptions", "bench_scale", "add_arguments", "options_from_args", "run_cli", "format_table"]

DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000)
_MB = 1024.0 * 1024.0


@dataclass
class ScaleOptions:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    #: Outstanding ``jobs.submit`` requests.
    window: int = 512
    #: Concurrent jobs of the worker that drains the queue (as ``bench noop``).
    slots: int = 256
    #: ``jobs.list`` calls per kind (unfiltered, ``status=queued``).
    list_calls: int = 20
    #: Restart the control plane with all N queued and time its index reload.
    restart_control_plane: bool = True
    #: Seconds of control-plane CPU sampled while idle with all N queued.
    idle_cpu_s: float = 3.0
    #: Progress lines on stderr this often (seconds; 0: none).
    progress_s: float = 10.0
    #: Give up draining after this long (None: 300 s + 10 ms per job).
    drain_timeout_s: float | None = None
    #: Extra ``MNEMOS_*`` settings for the stack's processes.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sizes or any(n <= 0 for n in self.sizes):
            raise ValueError(f"sizes must be positive job counts, got {self.sizes!r}")
        if self.window <= 0 or self.slots <= 0 or self.list_calls <= 0:
            raise ValueError("window, slots and list_calls must be positive")


# ---------------------------------------------------------------------------- the stack


@asynccontextmanager
async def _hosted_stack(n: int, o: ScaleOptions) -> AsyncIterator[LocalStack]:
    """``local_stack(workers=0)`` from a thread of its own: ``LocalStack.start`` runs
    ``asyncio.run`` (impossible on this loop), and its children die with the thread that
    forked them (``PR_SET_PDEATHSIG``), so that thread lives until the stack has stopped."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[LocalStack] = loop.create_future()
    done = threading.Event()
    errors: list[BaseException] = []

    def settle(stack: LocalStack | None, error: BaseException | None) -> None:
        if ready.done():
            return
        if error is not None:
            ready.set_exception(error)
        else:
            assert stack is not None
            ready.set_result(stack)

    # The default bound (100k queued per runtime) would refuse the larger sizes.
    env = {"MNEMOS_CP_MAX_QUEUED_PER_RUNTIME": str(max(100_000, 2 * n)), **o.env}

    def host() -> None:
        try:
            with local_stack(workers=0, slots=o.slots, env=env) as stack:
                loop.call_soon_threadsafe(settle, stack, None)
                done.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            errors.append(e)
            loop.call_soon_threadsafe(settle, None, e)

    thread = threading.Thread(target=host, name=f"scale-stack-{n}", daemon=True)
    thread.start()
    try:
        yield await ready
    finally:
        done.set()
        await asyncio.to_thread(thread.join)
    if errors and ready.done() and not ready.cancelled() and ready.exception() is None:
        raise errors[0]  # the stack failed to stop cleanly


def _start_worker(stack: LocalStack) -> subprocess.Popen[bytes]:
    """One worker process exactly as ``LocalStack`` defines its workers (same environment,
    log file), added to the stack's children so that its ``stop()`` drains it first.
    Called on the main thread, which outlives it."""
    template = LocalStack(dataclasses.replace(stack.options, workers=1, autoscale=False, gateway_port=0))
    (child,) = [c for c in template.children if c.name.startswith("worker")]
    stack.children.append(child)
    child.start()
    assert child.proc is not None
    return child.proc


def _control_plane(stack: LocalStack) -> Any:
    (child,) = [c for c in stack.children if c.name == "control-plane"]
    return child


def _nats_process(stack: LocalStack) -> psutil.Process:
    """The stack's nats-server (a child of this process, run with its config in the store)."""
    store = str(stack.nats.store_dir)
    for proc in psutil.Process().children():
        try:
            if "nats-server" in proc.name() and any(store in arg for arg in proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no nats-server child with its store in {store}")


def _rss_mb(proc: psutil.Process, *, tree: bool = False) -> float:
    procs = [proc, *proc.children(recursive=True)] if tree else [proc]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # a short-lived helper that just exited
    return total / _MB


async def _stream_bytes(client: Client, names: Names) -> dict[str, tuple[int, int]]:
    """(bytes, messages) of the dispatch, jobs-KV and results streams (``STREAM.INFO``)."""
    js = client.nc.jetstream()
    out: dict[str, tuple[int, int]] = {}
    for key, stream in (("dispatch", names.dispatch_stream), ("jobs_kv", Names.kv_stream(names.jobs_bucket)),
                        ("results", names.results_stream)):
        state = (await js.stream_info(stream)).state
        out[key] = (state.bytes, state.messages)
    return out


async def _dispatch_messages(client: Client, names: Names) -> int:
    return (await client.nc.jetstream().stream_info(names.dispatch_stream)).state.messages


# ---------------------------------------------------------------------------- phases


@asynccontextmanager
async def _progress(o: ScaleOptions, line: Callable[[float], Awaitable[str]]) -> AsyncIterator[None]:
    """Print ``await line(elapsed)`` to stderr every ``progress_s`` while the body runs."""
    if o.progress_s <= 0:
        yield
        return
    t0 = time.monotonic()

    async def report() -> None:
        while True:
            await asyncio.sleep(o.progress_s)
            print(await line(time.monotonic() - t0), file=sys.stderr, flush=True)

    task = asyncio.create_task(report(), name="scale-progress")
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass  # our own cancel; any other error of the reporter surfaces here


@dataclass
class _Submitted:
    sent: int = 0
    done: int = 0
    retries: int = 0
    #: The largest job id answered (ULIDs: the newest job, first on a jobs.list page).
    newest: str = ""


async def _submit_all(client: Client, n: int, o: ScaleOptions) -> tuple[float, _Submitted]:
    """Submit ``n`` no-op jobs with ``window`` requests outstanding: (seconds, counters).
    ``window`` loops share one counter, so memory does not grow with ``n``."""
    spec = job_spec("demo-fn:v1", function="noop")
    s = _Submitted()

    async def loop() -> None:
        while s.sent < n:
            s.sent += 1
            delay = 0.05
            while True:
                try:
                    record = await client.submit(spec)
                    break
                except MnemosError as e:
                    if not e.retryable:
                        raise
                    s.retries += 1  # shed or queue_full: back off, as a client should
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            s.done += 1
            if record.job_id > s.newest:
                s.newest = record.job_id

    async def line(elapsed: float) -> str:
        return f"  [N={n:,}] submitted {s.done:,}/{n:,} in {elapsed:.0f}s ({s.done / elapsed:,.0f} jobs/s, " \
               f"{s.retries} retries)"

    t0 = time.perf_counter()
    async with _progress(o, line):
        tasks = [asyncio.create_task(loop()) for _ in range(min(o.window, n))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return time.perf_counter() - t0, s


async def _until_listed(client: Client, newest: str, timeout: float) -> float:
    """Seconds until the first ``jobs.list`` page starts with ``newest`` (the control plane's
    index has caught up, or has reloaded after a restart)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        try:
            page = await client.list(limit=1)
            if page.jobs and page.jobs[0].job_id == newest:
                return time.perf_counter() - t0
        except MnemosError:
            pass  # the control plane is starting, or its index is still loading
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs.list did not show job {newest} within {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def _list_latency(client: Client, calls: int, status: list[str] | None) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(calls):
        t = time.perf_counter()
        page = await client.list(limit=50, status=status)
        samples.append((time.perf_counter() - t) * 1000.0)
        if len(page.jobs) != 50:
            raise RuntimeError(f"jobs.list answered {len(page.jobs)} jobs, not a full page of 50")
    p = percentiles(samples)
    return {"p50": p["p50"], "p95": p["p95"]}


async def _cpu_percent(proc: psutil.Process, seconds: float) -> float:
    """CPU use of ``proc`` over ``seconds`` (100 = one core)."""
    before = proc.cpu_times()
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    after = proc.cpu_times()
    used = float(after.user + after.system - before.user - before.system)
    return 100.0 * used / (time.perf_counter() - t0)


async def _restart_control_plane(stack: LocalStack, client: Client, newest: str, n: int) -> float:
    """Stop the control plane, start it again; seconds from its start until ``jobs.list``
    shows the newest job (process start + layout + the index replaying the jobs bucket)."""
    cp = _control_plane(stack)
    await asyncio.to_thread(cp.stop, 20.0)
    t0 = time.perf_counter()
    cp.start()  # on this thread, which outlives it (the child dies with its forking thread)
    await _until_listed(client, newest, timeout=120.0 + n / 1000.0)
    return time.perf_counter() - t0


async def _drain(stack: LocalStack, client: Client, n: int, o: ScaleOptions
                 ) -> tuple[dict[str, float], psutil.Process]:
    """Start one worker; time from its registration until the dispatch stream is empty."""
    names = stack.settings.names
    proc = _start_worker(stack)
    t_spawn = time.perf_counter()
    deadline = time.monotonic() + 120.0
    while True:
        live = [w for w in await client.workers() if w.status in ("idle", "busy")]
        if live:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; see {stack.logs}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not register within 120s; see {stack.logs}")
        await asyncio.sleep(0.05)
    worker_id = live[0].worker_id
    t0 = time.perf_counter()
    remaining_at_start = await _dispatch_messages(client, names)
    remaining = remaining_at_start

    async def line(elapsed: float) -> str:
        done = remaining_at_start - remaining
        return f"  [N={n:,}] drained {n - remaining:,}/{n:,} in {elapsed:.0f}s ({done / elapsed:,.0f} jobs/s)"

    timeout = o.drain_timeout_s if o.drain_timeout_s is not None else 300.0 + n / 100.0
    async with _progress(o, line):
        while remaining > 0:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{remaining} of {n} jobs still queued after {timeout:.0f}s; see {stack.logs}")
            await asyncio.sleep(0.1)
            remaining = await _dispatch_messages(client, names)
    elapsed = time.perf_counter() - t0
    reply = await client.nc.request(names.worker_control_subject(worker_id),
                                    encode(WorkerCommand(command="status")), timeout=10.0)
    record = decode(reply.data, WorkerRecord)
    return {
        "worker_start_s": t0 - t_spawn,
        "drain_s": elapsed,
        "drain_jobs_per_s": remaining_at_start / elapsed if elapsed > 0 else float("nan"),
        "completed": float(record.jobs_completed),
        "failed": float(record.jobs_failed),
    }, psutil.Process(proc.pid)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _per_job(prefix: str, streams: dict[str, tuple[int, int]], n: int) -> dict[str, float]:
    return {f"{key}_bytes_per_job_{prefix}": b / n for key, (b, _) in streams.items()}


async def _one_size(n: int, o: ScaleOptions) -> dict[str, float]:
    wall0 = time.perf_counter()
    async with _hosted_stack(n, o) as stack:
        stack_start_s = time.perf_counter() - wall0
        names = stack.settings.names
        client = await Client.connect(stack.settings, request_timeout=60)
        try:
            bench_rss_before = _rss_mb(psutil.Process())
            submit_s, s = await _submit_all(client, n, o)
            _say(f"  [N={n:,}] {n:,} jobs queued in {submit_s:.1f}s; timing jobs.list ...")
            index_lag_s = await _until_listed(client, s.newest, timeout=120.0 + n / 1000.0)
            listing = await _list_latency(client, o.list_calls, None)
            listing_queued = await _list_latency(client, o.list_calls, ["queued"])
            nats_proc = _nats_process(stack)
            cp_proc = psutil.Process(_control_plane(stack).proc.pid)
            cp_idle_cpu = await _cpu_percent(cp_proc, o.idle_cpu_s)
            queued_streams = await _stream_bytes(client, names)
            out: dict[str, float] = {
                "n": float(n),
                "stack_start_s": stack_start_s,
                "submit_s": submit_s,
                "submit_jobs_per_s": n / submit_s,
                "submit_retries": float(s.retries),
                "index_lag_s": index_lag_s,
                "list_p50_ms": listing["p50"],
                "list_p95_ms": listing["p95"],
                "list_queued_p50_ms": listing_queued["p50"],
                "list_queued_p95_ms": listing_queued["p95"],
                "cp_idle_cpu_pct_queued": cp_idle_cpu,
                "rss_mb_nats_queued": _rss_mb(nats_proc),
                "rss_mb_cp_queued": _rss_mb(cp_proc),
                "dispatch_messages_queued": float(queued_streams["dispatch"][1]),
                **_per_job("queued", queued_streams, n),
            }
            if o.restart_control_plane:
                _say(f"  [N={n:,}] restarting the control plane (its index reloads {n:,} jobs) ...")
                out["cp_restart_s"] = await _restart_control_plane(stack, client, s.newest, n)
                cp_proc = psutil.Process(_control_plane(stack).proc.pid)
                out["rss_mb_cp_restarted"] = _rss_mb(cp_proc)
            _say(f"  [N={n:,}] starting one worker ({o.slots} slots) to drain the queue ...")
            drained, worker = await _drain(stack, client, n, o)
            out.update(drained)
            drained_streams = await _stream_bytes(client, names)
            out.update({
                "rss_mb_nats_drained": _rss_mb(nats_proc),
                "rss_mb_cp_drained": _rss_mb(cp_proc),
                "rss_mb_worker_drained": _rss_mb(worker, tree=True),
                **_per_job("drained", drained_streams, n),
                "rss_mb_bench_before": bench_rss_before,
                "rss_mb_bench": _rss_mb(psutil.Process()),
            })
        finally:
            await client.close()
    out["wall_s"] = time.perf_counter() - wall0
    return out


async def bench_scale(o: ScaleOptions) -> list[dict[str, float]]:
    """One fresh stack per size in ``o.sizes``; one line printed per size; the numbers."""
    results: list[dict[str, float]] = []
    for n in o.sizes:
        _say(f"N={n:,}: starting a fresh local stack (no worker) ...")
        r = await _one_size(n, o)
        results.append(r)
        print(_line(r), flush=True)
    return results


# ---------------------------------------------------------------------------- output


def _line(r: dict[str, float]) -> str:
    return (f"N={int(r['n']):,}: submit {r['submit_jobs_per_s']:,.0f} jobs/s; jobs.list p50 "
            f"{r['list_p50_ms']:.1f} ms (status=queued {r['list_queued_p50_ms']:.1f} ms); "
            f"RSS nats {r['rss_mb_nats_queued']:.0f} MB, control plane {r['rss_mb_cp_queued']:.0f} MB "
            f"(idle CPU {r['cp_idle_cpu_pct_queued']:.0f}%); "
            f"{_bytes_per_job(r, 'queued')} queued; "
            + (f"control-plane restart {r['cp_restart_s']:.1f} s; " if "cp_restart_s" in r else "")
            + f"drain {r['drain_jobs_per_s']:,.0f} jobs/s ({int(r['completed']):,} completed, "
              f"{int(r['failed'])} failed); worker RSS {r['rss_mb_worker_drained']:.0f} MB; "
              f"{_bytes_per_job(r, 'drained')} drained; wall {r['wall_s']:.0f} s")


def _bytes_per_job(r: dict[str, float], when: str) -> str:
    return "B/job " + "/".join(f"{r[f'{k}_bytes_per_job_{when}']:.0f}" for k in ("dispatch", "jobs_kv", "results")) \
        + " (dispatch/jobs KV/results)"


_COLUMNS: list[tuple[str, str | tuple[str, ...], str]] = [
    ("N", "n", "{:,.0f}"),
    ("wall s", "wall_s", "{:.0f}"),
    ("submit/s", "submit_jobs_per_s", "{:,.0f}"),
    ("list p50 ms", "list_p50_ms", "{:.1f}"),
    ("queued p50 ms", "list_queued_p50_ms", "{:.1f}"),
    ("CP idle CPU%", "cp_idle_cpu_pct_queued", "{:.0f}"),
    ("CP restart s", "cp_restart_s", "{:.1f}"),
    ("drain/s", "drain_jobs_per_s", "{:,.0f}"),
    ("RSS nats MB q/d", ("rss_mb_nats_queued", "rss_mb_nats_drained"), "{:.0f}"),
    ("RSS CP MB q/r/d", ("rss_mb_cp_queued", "rss_mb_cp_restarted", "rss_mb_cp_drained"), "{:.0f}"),
    ("RSS worker MB", "rss_mb_worker_drained", "{:.0f}"),
    ("RSS bench MB", ("rss_mb_bench_before", "rss_mb_bench"), "{:.0f}"),
    ("B/job queued d/kv/r", ("dispatch_bytes_per_job_queued", "jobs_kv_bytes_per_job_queued",
                             "results_bytes_per_job_queued"), "{:.0f}"),
    ("B/job drained d/kv/r", ("dispatch_bytes_per_job_drained", "jobs_kv_bytes_per_job_drained",
                              "results_bytes_per_job_drained"), "{:.0f}"),
]


def format_table(results: list[dict[str, float]]) -> str:
    """The results as a Markdown table, one row per size."""
    def cell(r: dict[str, float], keys: str | tuple[str, ...], fmt: str) -> str:
        ks = (keys,) if isinstance(keys, str) else keys
        return "/".join(fmt.format(r[k]) if k in r else "-" for k in ks)

    rows = [[title for title, _, _ in _COLUMNS]]
    rows += [[cell(r, keys, fmt) for _, keys, fmt in _COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(s)) for s in text.replace("_", "").split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes are comma-separated job counts (1000,10000), got {text!r}") from e
    if not sizes or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m loadtest bench scale``."""
    d = ScaleOptions()
    p.add_argument("--sizes", type=_sizes, default=d.sizes,
                   help="comma-separated queue sizes, one fresh stack each (default 1000,10000,100000,1000000)")
    p.add_argument("--window", type=int, default=d.window, help="outstanding jobs.submit requests")
    p.add_argument("--slots", type=int, default=d.slots, help="concurrent jobs of the draining worker")
    p.add_argument("--list-calls", type=int, default=d.list_calls, help="jobs.list calls per kind")
    p.add_argument("--no-restart", action="store_true",
                   help="skip restarting the control plane with all N queued (its index reload time)")
    p.add_argument("--progress", type=float, default=d.progress_s, help="seconds between progress lines on stderr")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")


def options_from_args(args: argparse.Namespace) -> ScaleOptions:
    return ScaleOptions(sizes=tuple(args.sizes), window=args.window, slots=args.slots, list_calls=args.list_calls,
                        restart_control_plane=not args.no_restart, progress_s=args.progress)


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``add_arguments`` options; print the table (and JSON)."""
    results = asyncio.run(bench_scale(options_from_args(args)))
    print()
    print(format_table(results))
    if args.json:
        print(json.dumps(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.scale_bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
