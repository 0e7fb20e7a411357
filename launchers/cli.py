"""The ``mnemos`` command line: run the platform's processes and manage jobs.

Settings come from ``MNEMOS_*`` environment variables (read once, here) and the global
options. Exit codes scripts can rely on (docs/cli.md has the same table): 0 ok; 1 the job
ended failed/timeout/cancelled; 2 usage error; 3 not found; 4 invalid request or
configuration; 5 NATS or control plane unavailable; 6 conflict / wrong state; 7 queue full;
10 anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mnemos.config import NatsSettings
from mnemos.permissions import ROLES
from mnemos.errors import JobTimeout, MnemosError
from mnemos.messages import JobRecord, ResultChunk, ResultFinal, ResultMessage, ResultStatus, encode

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from mnemos.client import Client

__all__ = ["main", "cli"]

T = TypeVar("T")


class _LazyConsole:
    """A rich ``Console`` made on first use: rich is a twentieth of a fresh worker's
    start-up imports, and the long-running commands (worker, control plane) never print
    with it."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def real(self) -> Console:
        """The console itself (for rich APIs that take one)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True)


def _table(*columns: str, **options: Any) -> Any:
    """A rich ``Table`` (rich imported when a command prints one)."""
    from rich.table import Table

    return Table(*columns, **options)


def _simple_head() -> Any:
    from rich import box

    return box.SIMPLE_HEAD

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job ended failed, timeout or cancelled
EXIT_USAGE = 2  # click's own code for a bad option or argument
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4  # the request (or the configuration) is invalid
EXIT_UNAVAILABLE = 5
EXIT_CONFLICT = 6
EXIT_QUEUE_FULL = 7
EXIT_OTHER = 10

#: Exit code by error code. Keyed by the stable ``code``, not by ``status``: statuses follow
#: HTTP conventions and may be refined; what a script switches on must not move.
EXIT_BY_CODE: dict[str, int] = {
    "job_not_found": EXIT_NOT_FOUND,
    "model_not_found": EXIT_NOT_FOUND,
    "unknown_function": EXIT_NOT_FOUND,
    "invalid_json": EXIT_INVALID,
    "invalid_request": EXIT_INVALID,
    "unsupported_media_type": EXIT_INVALID,
    "validation_error": EXIT_INVALID,
    "override_refused": EXIT_INVALID,
    "payload_too_large": EXIT_INVALID,
    "unknown_model": EXIT_INVALID,
    "unknown_runtime": EXIT_INVALID,
    "unavailable": EXIT_UNAVAILABLE,
    "not_connected": EXIT_UNAVAILABLE,
    "conflict": EXIT_CONFLICT,
    "invalid_state": EXIT_CONFLICT,
    "not_cancellable": EXIT_CONFLICT,
    "queue_full": EXIT_QUEUE_FULL,
    "quota_exceeded": EXIT_QUEUE_FULL,
    "tenant_not_found": EXIT_NOT_FOUND,
    "pool_not_found": EXIT_NOT_FOUND,
    "app_not_found": EXIT_NOT_FOUND,
    "forbidden": EXIT_INVALID,
}


def _exit_code(e: MnemosError) -> int:
    return EXIT_BY_CODE.get(e.code, EXIT_OTHER)


class _Ctx:
    def __init__(self, settings: NatsSettings, output: str) -> None:
        self.settings = settings
        self.output = output


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except MnemosError as e:
        err_console.print(f"[red]error[/red] [bold]{e.code}[/bold]: {e.message}")
        sys.exit(_exit_code(e))


async def _serve_until_signal(serve: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    """Run a long-lived role; SIGINT/SIGTERM set the stop event (handled only here)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await serve(stop)


def _settings(cls: type[T], **overrides: Any) -> T:
    """Settings from the environment plus ``overrides``; invalid ones exit with code 4."""
    import pydantic

    try:
        return cls(**overrides)
    except pydantic.ValidationError as e:
        err_console.print(f"[red]error[/red] [bold]invalid configuration[/bold] ({cls.__name__}):\n{e}")
        sys.exit(EXIT_INVALID)


def _setup_logging() -> None:
    level = os.environ.get("MNEMOS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.option("--nats-url", envvar="MNEMOS_NATS_URL", default=None, help="NATS server URL(s).")
@click.option("--namespace", envvar="MNEMOS_NAMESPACE", default=None, help="Subject/bucket prefix.")
@click.option("--creds", envvar="MNEMOS_NATS_CREDS", default=None,
              help="NATS credentials file (default: the operator's that `mnemos up` wrote in MNEMOS_DATA_DIR).")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", help="Output format.")
@click.pass_context
def cli(ctx: click.Context, nats_url: str | None, namespace: str | None, creds: str | None, output: str) -> None:
    """MNEMOS: serverless AI inference on your own GPUs, coordinated over NATS."""
    overrides: dict[str, Any] = {}
    if nats_url:
        overrides["nats_url"] = nats_url
    if namespace:
        overrides["namespace"] = namespace
    if creds:
        overrides["nats_creds"] = creds
    ctx.obj = _Ctx(_settings(NatsSettings, **overrides), output)


# ---------------------------------------------------------------------------- processes


@cli.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".mnemos"), show_default=True,
              envvar="MNEMOS_DATA_DIR")
@click.option("--port", type=int, default=4222, show_default=True, help="Embedded NATS port.")
@click.option("--workers", "--min-workers", "workers", type=int, default=1, show_default=True,
              help="Workers kept running (the local pool's min_workers; 0: scale to zero).")
@click.option("--max-workers", type=int, default=4, show_default=True, help="The local pool's max_workers.")
@click.option("--slots", type=int, default=4, show_default=True, help="Concurrent jobs per worker.")
@click.option("--gateway-port", type=int, default=8080, show_default=True, help="HTTP gateway port (0: none).")
@click.option("--auth/--no-auth", default=True, show_default=True,
              help="NATS users per role with least permissions, credentials in DATA_DIR/auth "
                   "(--no-auth: an open server).")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Serve NATS over TLS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The certificate's private key (PEM).")
@click.option("--tls-ca", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The CA that signed the certificate (default: the certificate itself, self-signed).")
@click.pass_obj
def up(obj: _Ctx, data_dir: Path, port: int, workers: int, max_workers: int, slots: int, gateway_port: int,
       auth: bool, tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None) -> None:
    """Run everything locally: embedded NATS, control plane, the autoscaler with local
    workers, the demo model, the HTTP gateway."""
    from launchers.up import UpOptions, run_up

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    _setup_logging()
    sys.exit(run_up(UpOptions(data_dir=data_dir, port=port, workers=workers, worker_slots=slots,
                              namespace=obj.settings.namespace, gateway_port=gateway_port, autoscale=True,
                              max_workers=max_workers, auth=auth, tls_cert=tls_cert, tls_key=tls_key,
                              tls_ca=tls_ca)))


@cli.command("control-plane")
@click.pass_obj
def control_plane_cmd(obj: _Ctx) -> None:
    """Run a control-plane process (any number may run)."""
    from control_plane.config import ControlPlaneSettings
    from control_plane.main import serve

    _setup_logging()
    settings = _settings(ControlPlaneSettings)
    _run(_serve_until_signal(lambda stop: serve(obj.settings, settings, stop)))


@cli.command("worker")
@click.option("--runtimes", default=None, help="Comma-separated runtimes (default: all that can run here).")
@click.option("--slots", type=int, default=None, help="Concurrent jobs (MNEMOS_WORKER_MAX_CONCURRENT_JOBS).")
@click.pass_obj
def worker_cmd(obj: _Ctx, runtimes: str | None, slots: int | None) -> None:
    """Run a worker: pull jobs by priority and run them; SIGTERM drains."""
    from neuron_runtime.config import WorkerSettings
    from neuron_runtime.main import serve
    from registry.config import RegistrySettings

    _setup_logging()
    overrides: dict[str, Any] = {}
    if runtimes:
        overrides["runtimes"] = runtimes
    if slots:
        overrides["max_concurrent_jobs"] = slots
    settings = _settings(WorkerSettings, **overrides)
    registry_settings = _settings(RegistrySettings)
    _run(_serve_until_signal(lambda stop: serve(obj.settings, settings, registry_settings, stop)))


@cli.command("autoscaler")
@click.pass_obj
def autoscaler_cmd(obj: _Ctx) -> None:
    """Run an autoscaler (any number may run; the one holding the lease acts)."""
    from control_plane.autoscaler.config import AutoscalerSettings
    from control_plane.autoscaler.main import serve

    _setup_logging()
    settings = _settings(AutoscalerSettings)
    _run(_serve_until_signal(lambda stop: serve(obj.settings, settings, stop)))


@cli.command("zygote", hidden=True)
def zygote_cmd() -> None:
    """Pre-import the runtimes and fork a worker per request on stdin (the local provider's)."""
    from launchers.zygote import main as zygote_main

    sys.exit(zygote_main())


@cli.command("gateway")
@click.option("--host", default=None, help="Address to bind (MNEMOS_GATEWAY_HOST, default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (MNEMOS_GATEWAY_PORT, default 8080).")
@click.pass_obj
def gateway_cmd(obj: _Ctx, host: str | None, port: int | None) -> None:
    """Run the HTTP gateway (job API, OpenAI-compatible API, /metrics). Without API keys it
    serves loopback only and refuses other addresses (exit code 4)."""
    from control_plane.gateway.config import GatewaySettings
    from control_plane.gateway.main import serve

    _setup_logging()
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = _settings(GatewaySettings, **overrides)
    try:
        _run(_serve_until_signal(lambda stop: serve(obj.settings, settings, stop)))
    except ValueError as e:  # refused configuration (e.g. a public address without API keys)
        err_console.print(f"[red]error[/red] [bold]invalid configuration[/bold]: {e}")
        sys.exit(4)


# ---------------------------------------------------------------------------- jobs


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _print_record(obj: _Ctx, record: JobRecord) -> None:
    if obj.output == "json":
        click.echo(encode(record).decode())
        return
    t = _table(show_header=False, box=None)
    t.add_row("job", record.job_id)
    t.add_row("status", record.status)
    t.add_row("model", f"{record.spec.model.family}:{record.spec.model.version} ({record.runtime})")
    t.add_row("attempt", str(record.attempt))
    if record.worker_id:
        t.add_row("worker", record.worker_id)
    tm = record.timings
    t.add_row("timings", f"queue {_ms(tm.queue_ms)}, load {_ms(tm.load_ms)}, first token {_ms(tm.first_token_ms)}, "
              f"run {_ms(tm.run_ms)}, cache hit {'-' if tm.cache_hit is None else tm.cache_hit}")
    if record.output is not None:
        t.add_row("result", json.dumps(record.output.result) if not isinstance(record.output.result, str)
                  else record.output.result)
        if record.output.metadata:
            t.add_row("metadata", json.dumps(record.output.metadata))
    if record.error is not None:
        t.add_row("error", f"{record.error.code}: {record.error.message}")
    if record.waiting is not None:
        t.add_row("waiting", f"{record.waiting.reason} for {record.waiting.waited_s:g} s: {record.waiting.detail}")
    if record.dead_letter:
        t.add_row("dead letter", "yes: its retries are used up")
    if len(record.attempts) > 1 or record.dead_letter:
        for a in record.attempts:
            error = f" ({a.error.code}: {a.error.message})" if a.error is not None else ""
            t.add_row(f"attempt {a.attempt}", f"{a.outcome or 'running'} on {a.worker_id}{error}")
    console.print(t)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def _job_exit(record: JobRecord) -> None:
    if record.terminal and record.status != "completed":
        sys.exit(EXIT_JOB_FAILED)


class _Spinner:
    """A spinner on stderr with a job's status, for people only: shown when stderr is a
    terminal and the output is a table, never in scripts or pipes. It must stop before
    anything is written to stdout (a live display captures stdout while it runs)."""

    def __init__(self, obj: _Ctx, job_id: str) -> None:
        self.job_id = job_id
        self._status: Status | None = None
        if obj.output == "table" and err_console.is_terminal:
            self._status = err_console.status(self._text("queued"))
            self._status.start()

    def _text(self, what: str) -> str:
        return f"[bold]{self.job_id}[/bold] {what}"

    def show(self, item: ResultMessage, chunks: int) -> None:
        if self._status is None:
            return
        if isinstance(item, ResultStatus):
            what = f"{item.status} on {item.worker_id}" if item.worker_id else item.status
        elif isinstance(item, ResultChunk):
            what = f"streaming: {chunks} chunk{'s' if chunks != 1 else ''}"
        elif item.status == "retrying":
            what = f"attempt {item.attempt} failed; retrying"
        else:
            what = item.status
        self._status.update(self._text(what))

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


async def _follow(obj: _Ctx, client: Client, job_id: str, *, echo: bool) -> None:
    """Follow a job's result stream (from its start) until the job ends. With ``echo`` the
    output goes to stdout: as a table, text as it is generated and data one JSON value per
    line; as JSON, every result message on its own line. A spinner shows the status until
    the first output."""
    spinner = _Spinner(obj, job_id)
    chunks = 0
    line_open = False  # text was written without a newline after it
    try:
        async for item in client.stream(job_id):
            chunks += isinstance(item, ResultChunk)
            if echo and obj.output == "json":
                click.echo(encode(item).decode())
            elif echo and isinstance(item, ResultChunk):
                spinner.stop()
                if item.data is not None:
                    sys.stdout.write(("\n" if line_open else "") + json.dumps(item.data) + "\n")
                    line_open = False
                elif item.text:
                    sys.stdout.write(item.text)
                    line_open = not item.text.endswith("\n")
                sys.stdout.flush()
            elif echo and isinstance(item, ResultFinal) and item.status == "retrying":
                spinner.stop()
                if line_open:
                    sys.stdout.write("\n")
                    line_open = False
                reason = f" ({item.error.code}: {item.error.message})" if item.error else ""
                err_console.print(f"[yellow]attempt {item.attempt} failed{reason}; retrying[/yellow]")
            else:
                spinner.show(item, chunks)
    finally:
        spinner.stop()
        if line_open:
            sys.stdout.write("\n")


async def _wait(obj: _Ctx, client: Client, job_id: str, timeout: float) -> JobRecord:
    """``client.wait``, with the job's status on a spinner while a person watches."""
    if obj.output != "table" or not err_console.is_terminal:
        return await client.wait(job_id, timeout=timeout)
    try:
        async with asyncio.timeout(timeout) as deadline:
            await _follow(obj, client, job_id, echo=False)
    except TimeoutError as e:
        if deadline.expired():
            raise JobTimeout(f"job {job_id} did not finish within {timeout:g}s") from e
        raise
    return await client.wait(job_id, timeout=timeout)


@cli.command()
@click.option("--model", "-m", required=True, help="family:version")
@click.option("--prompt", "-p", default=None)
@click.option("--arg", "args", multiple=True, help="Positional argument (JSON or string); repeatable.")
@click.option("--kwarg", "kwargs", multiple=True, help="key=value (value JSON or string); repeatable.")
@click.option("--function", default=None, help="Function of a python model to call.")
@click.option("--runtime", default=None)
@click.option("--priority", type=click.IntRange(1, 10), default=5, show_default=True)
@click.option("--timeout", "timeout_seconds", type=float, default=300.0, show_default=True)
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--stop", "stop_seq", multiple=True)
@click.option("--seed", type=int, default=None)
@click.option("--idempotency-key", default=None)
@click.option("--queue-timeout", "queue_timeout_seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="End the job `timeout` (queue_timeout) if no worker takes it within this many seconds.")
@click.option("--stream", is_flag=True, help="Print output as it is generated.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print it.")
@click.pass_obj
def submit(obj: _Ctx, model: str, prompt: str | None, args: tuple[str, ...], kwargs: tuple[str, ...],
           function: str | None, runtime: str | None, priority: int, timeout_seconds: float,
           max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
           stop_seq: tuple[str, ...], seed: int | None, idempotency_key: str | None,
           queue_timeout_seconds: float | None, stream: bool, wait: bool) -> None:
    """Submit a job."""
    from mnemos.client import Client, job_spec

    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                 stop=list(stop_seq) or None)
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    kw = {}
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--kwarg needs key=value, got {item!r}")
        kw[key] = _parse_value(value)

    async def go() -> JobRecord:
        spec = job_spec(model, prompt=prompt, args=[_parse_value(a) for a in args], kwargs=kw, function=function,
                        runtime=runtime, priority=priority, timeout_seconds=timeout_seconds,
                        idempotency_key=idempotency_key, queue_timeout_seconds=queue_timeout_seconds, **params)
        async with await Client.connect(obj.settings) as client:
            record = await client.submit(spec)
            if stream:
                await _follow(obj, client, record.job_id, echo=True)
                return await client.get(record.job_id)
            if wait:
                return await _wait(obj, client, record.job_id, timeout_seconds + 60)
            return record

    record = _run(go())
    if stream and obj.output == "json":
        pass  # the result messages were the output; the last one is the final message
    elif stream:
        meta = record.output.metadata if record.output else {}
        err_console.print(
            f"[dim]{record.job_id} {record.status}; tokens {meta.get('completion_tokens', '-')}, "
            f"first token {_ms(record.timings.first_token_ms)}, run {_ms(record.timings.run_ms)}[/dim]"
        )
        if record.error:
            err_console.print(f"[red]{record.error.code}[/red]: {record.error.message}")
    else:
        _print_record(obj, record)
    _job_exit(record)


@cli.group()
def jobs() -> None:
    """List, inspect, cancel, retry and watch jobs."""


@jobs.command("ls")
@click.option("--status", multiple=True, help="Filter by status; repeatable.")
@click.option("--model", default=None, help="family:version or alias")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--cursor", default=None, help="next_cursor of the previous page")
@click.option("--dead-letter", is_flag=True, help="Only jobs that ended failed/timeout with their retries used up.")
@click.pass_obj
def jobs_ls(obj: _Ctx, status: tuple[str, ...], model: str | None, limit: int, cursor: str | None,
            dead_letter: bool) -> None:
    """List jobs, newest first (one page; the next with --cursor)."""
    from mnemos.client import Client

    async def go() -> Any:
        async with await Client.connect(obj.settings) as client:
            return await client.list(status=list(status) or None, model=model, limit=limit, cursor=cursor,
                                     dead_letter=dead_letter)

    page = _run(go())
    if obj.output == "json":
        click.echo(encode(page).decode())
        return
    t = _table("job", "status", "model", "runtime", "prio", "attempt", "worker", "run ms", "created")
    for r in page.jobs:
        t.add_row(r.job_id, r.status, f"{r.spec.model.family}:{r.spec.model.version}", r.runtime,
                  str(r.spec.priority), str(r.attempt), r.worker_id or "-", str(r.timings.run_ms or "-"),
                  r.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(t)
    if page.next_cursor:
        console.print(f"[dim]more: --cursor {page.next_cursor}[/dim]")


def _job_command(name: str, help_text: str, call: Callable[[Any, str], Awaitable[JobRecord]]) -> None:
    @jobs.command(name, help=help_text)
    @click.argument("job_id")
    @click.pass_obj
    def command(obj: _Ctx, job_id: str) -> None:
        from mnemos.client import Client

        async def go() -> JobRecord:
            async with await Client.connect(obj.settings) as client:
                return await call(client, job_id)

        _print_record(obj, _run(go()))


_job_command("get", "Show a job.", lambda c, j: c.get(j))
_job_command("cancel", "Cancel a queued or running job.", lambda c, j: c.cancel(j))
_job_command("retry", "Re-run a failed, timed-out or cancelled job.", lambda c, j: c.retry(j))


@jobs.command("watch")
@click.argument("job_id")
@click.pass_obj
def jobs_watch(obj: _Ctx, job_id: str) -> None:
    """Follow a job's result stream (replayed from the start) until it ends."""
    from mnemos.client import Client

    async def go() -> JobRecord:
        async with await Client.connect(obj.settings) as client:
            await _follow(obj, client, job_id, echo=True)
            return await client.get(job_id)

    record = _run(go())
    if obj.output != "json":
        _print_record(obj, record)
    _job_exit(record)


# ---------------------------------------------------------------------------- workers, models


@cli.group()
def workers() -> None:
    """Workers registered in this namespace."""


@workers.command("ls")
@click.option("--runtime", default=None)
@click.pass_obj
def workers_ls(obj: _Ctx, runtime: str | None) -> None:
    """List the registered workers: status, slots, loaded models."""
    from mnemos.client import Client

    async def go() -> Any:
        async with await Client.connect(obj.settings) as client:
            return await client.workers(runtime)

    found = _run(go())
    if obj.output == "json":
        click.echo(encode(found).decode())
        return
    t = _table("worker", "status", "runtimes", "slots free", "running", "loaded models", "done", "failed", "gpus")
    for w in found:
        gpus = len(w.resources.gpus) if w.resources else 0
        t.add_row(w.worker_id, w.status, ",".join(w.runtimes), f"{w.free_slots}/{w.max_concurrent_jobs}",
                  str(len(w.current_jobs)), ",".join(w.loaded_models) or "-", str(w.jobs_completed),
                  str(w.jobs_failed), str(gpus))
    console.print(t)


# ---------------------------------------------------------------------------- pools


@cli.group()
def pools() -> None:
    """Autoscaler pools: sets of identical workers sized to their work (the operator's)."""


def _client_call(obj: _Ctx, call: Callable[[Any], Awaitable[T]]) -> T:
    from mnemos.client import Client

    async def go() -> T:
        async with await Client.connect(obj.settings) as client:
            return await call(client)

    return _run(go())


@pools.command("ls")
@click.pass_obj
def pools_ls(obj: _Ctx) -> None:
    """List the pools: bounds, workers (desired, ready, starting, draining), queued work."""
    found = _client_call(obj, lambda c: c.pools())
    if obj.output == "json":
        click.echo(encode(found).decode())
        return
    # Narrow enough for 80 columns; `pools get` shows runtimes, models and the decisions.
    t = _table("pool", "provider", "min-max", "want", "ready", "busy", "start", "drain", "jobs", "full",
              box=_simple_head(), padding=(0, 1, 0, 0), show_edge=False)
    for view in found:
        spec, st = view.spec, view.status
        counts = (["-"] * 7 if st is None else
                  [str(st.desired), str(st.ready), str(st.busy), str(st.starting), str(st.draining), str(st.messages),
                   "[red]yes[/red]" if st.at_max else "no"])
        t.add_row(spec.name, spec.provider, f"{spec.min_workers}-{spec.max_workers}", *counts)
    console.print(t)


@pools.command("get")
@click.argument("name")
@click.pass_obj
def pools_get(obj: _Ctx, name: str) -> None:
    """A pool's settings, status, workers and latest scaling decisions (with their reasons)."""
    view = _client_call(obj, lambda c: c.pool(name))
    if obj.output == "json":
        click.echo(encode(view).decode())
        return
    spec, st = view.spec, view.status
    console.print(f"[bold]{spec.name}[/bold]  provider {spec.provider}  runtimes {','.join(spec.runtimes)}  "
                  f"models {','.join(spec.models) or '*'}")
    console.print(f"  workers min {spec.min_workers} max {spec.max_workers}  slots {spec.worker_slots}  "
                  f"target concurrency {spec.target_concurrency or 'slots'}  buffer {spec.buffer_workers}  "
                  f"scale-down window {spec.scaledown_window_s:g}s")
    if st is None:
        console.print("  no autoscaler has acted on this pool yet (is `mnemos autoscaler` running?)")
        return
    console.print(f"  desired {st.desired}  ready {st.ready} (busy {st.busy})  starting {st.starting}  "
                  f"draining {st.draining}  messages {st.messages} {st.messages_by_priority or ''}  "
                  f"running {st.running}{'  [red]AT MAX_WORKERS: work waits[/red]' if st.at_max else ''}")
    console.print(f"  by {st.autoscaler}, {st.updated_at.isoformat(timespec='seconds')}")
    if st.workers:
        t = _table("worker", "state", "since", "provisioning", "busy", "detail")
        for w in st.workers:
            t.add_row(w.worker_id, w.state, w.since.isoformat(timespec="seconds"),
                      "-" if w.provisioning_s is None else f"{w.provisioning_s:.2f}s", "yes" if w.busy else "no",
                      w.detail or "-")
        console.print(t)
    if st.decisions:
        t = _table("at", "action", "reason", "asked", "outcome")
        for d in st.decisions[-10:]:
            t.add_row(d.at.isoformat(timespec="seconds"), d.action, d.reason, d.asked or "-", d.outcome or "-")
        console.print(t)


@pools.command("set")
@click.argument("name")
@click.option("--runtime", "runtimes", multiple=True, required=True, help="A runtime the pool serves (repeat).")
@click.option("--model", "models_", multiple=True, help="A model the pool is for (repeat; default: every model).")
@click.option("--provider", type=click.Choice(["local", "aws"]), default="local", show_default=True)
@click.option("--setting", "settings_", multiple=True, help="A provider setting KEY=VALUE (repeat).")
@click.option("--min", "min_workers", type=int, default=0, show_default=True)
@click.option("--max", "max_workers", type=int, default=4, show_default=True)
@click.option("--slots", type=int, default=4, show_default=True, help="Concurrent jobs per worker.")
@click.option("--target-concurrency", type=int, default=None, help="Jobs per worker to aim at (default: slots).")
@click.option("--buffer", "buffer_workers", type=int, default=0, show_default=True,
              help="Idle spares kept warm while there is work.")
@click.option("--scaledown-window", type=float, default=60.0, show_default=True,
              help="Seconds of surplus before scaling down.")
@click.option("--start-timeout", type=float, default=180.0, show_default=True,
              help="Seconds a started worker has to register before it is replaced (a cloud GPU boot: more).")
@click.option("--description", default="")
@click.pass_obj
def pools_set(obj: _Ctx, name: str, runtimes: tuple[str, ...], models_: tuple[str, ...], provider: str,
              settings_: tuple[str, ...], min_workers: int, max_workers: int, slots: int,
              target_concurrency: int | None, buffer_workers: int, scaledown_window: float, start_timeout: float,
              description: str) -> None:
    """Create or replace a pool (the acting autoscaler follows within a tick)."""
    from mnemos.messages import PoolSpec, SetPool

    provider_settings: dict[str, Any] = {}
    for pair in settings_:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--setting")
        provider_settings[key] = _parse_value(value)
    body = {"pool": {"type": "io.mnemos.v1.pool", "name": name, "runtimes": list(runtimes), "models": list(models_),
                     "provider": provider, "provider_settings": provider_settings, "min_workers": min_workers,
                     "max_workers": max_workers, "worker_slots": slots, "target_concurrency": target_concurrency,
                     "buffer_workers": buffer_workers, "scaledown_window_s": scaledown_window,
                     "start_timeout_s": start_timeout, "description": description}}
    spec: PoolSpec = _decoded(body, SetPool).pool
    view = _client_call(obj, lambda c: c.set_pool(spec))
    _done(obj, view, f"pool {view.spec.name} set (revision {view.revision})")


def _decoded(body: dict[str, Any], kind: type[T]) -> T:
    """``body`` (built from options) as the request ``kind``; an invalid one exits 4 with its error."""
    from mnemos.messages import decode

    try:
        return decode(json.dumps(body), kind)
    except MnemosError as e:
        err_console.print(f"[red]error[/red] [bold]{e.code}[/bold]: {e.message}")
        sys.exit(_exit_code(e))


def _done(obj: _Ctx, reply: Any, said: str) -> None:
    """A change's reply: as JSON (``-o json``), else one line saying what was done."""
    if obj.output == "json":
        click.echo(encode(reply).decode())
    else:
        console.print(said)


@pools.command("rm")
@click.argument("name")
@click.pass_obj
def pools_rm(obj: _Ctx, name: str) -> None:
    """Remove a pool: the autoscaler drains its workers (idle ones at once, busy ones after their jobs)."""
    view = _client_call(obj, lambda c: c.delete_pool(name))
    _done(obj, view, f"pool {view.spec.name} removed; its workers drain")


# ------------------------------------------------------------------ apps


@cli.command()
@click.argument("app_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--app", "app_name", default=None, help="The app to deploy when the file defines several.")
@click.pass_obj
def deploy(obj: _Ctx, app_file: Path, app_name: str | None) -> None:
    """Deploy an app: package its source as a new content-addressed version (the same
    source is the same version: a no-op), register it, make it live, size its pool."""
    from launchers.deploy import deploy as deploy_app

    done = _run(deploy_app(obj.settings, app_file, app_name=app_name))
    if obj.output == "json":
        click.echo(encode(done).decode())
        return
    rec = done.app
    state = "deployed" if done.changed else "unchanged:"
    was = f" (was {rec.previous_version})" if done.changed and rec.previous_version else ""
    console.print(f"{state} app [bold]{rec.name}[/bold] version {rec.version}{was}; pool {rec.pool}")
    for d in rec.definitions:
        console.print(f"  {d.kind} {', '.join(d.targets or [f'{d.name}.{m.name}' for m in d.methods])}")


def _split_target(spec: str) -> tuple[Path, str]:
    file, sep, target = spec.partition("::")
    if not sep or not target:
        raise click.BadParameter(f"expected FILE.py::FUNCTION (or FILE.py::Class.method), got {spec!r}")
    return Path(file), target


@cli.command("run")
@click.argument("target")
@click.argument("args", nargs=-1)
@click.option("--kwarg", "kwargs", multiple=True, help="key=value (value JSON or string); repeatable.")
@click.option("--app", "app_name", default=None, help="The app, when the file defines several.")
@click.pass_obj
def run_cmd(obj: _Ctx, target: str, args: tuple[str, ...], kwargs: tuple[str, ...], app_name: str | None) -> None:
    """Call one function of an app ad hoc: `mnemos run app.py::add 2 3`. The app is
    deployed first (a no-op when this source is live); arguments are JSON or strings;
    a generator's items are printed as they stream."""
    import mnemos.app as mnemos_app
    from launchers.deploy import deploy as deploy_app

    app_file, name = _split_target(target)
    parsed_kwargs = dict(_kwarg(k) for k in kwargs)
    parsed_args = [_parse_value(a) for a in args]

    async def go() -> None:
        done = await deploy_app(obj.settings, app_file, app_name=app_name)
        if done.changed:
            err_console.print(f"deployed {done.app.name} version {done.app.version}")
        owner, _, attr = name.partition(".")
        mnemos_app.configure(obj.settings)
        definition = done.app.definition(owner)
        if definition is None or (definition.kind == "class") != bool(attr):
            raise click.BadParameter(f"app {done.app.name} has no {name!r}; it defines "
                                     f"{', '.join(t for d in done.app.definitions for t in d.targets)}")
        handle: Any
        if attr:
            handle = getattr(mnemos_app.Cls(done.app.name, definition)(), attr, None)
            if handle is None:
                raise click.BadParameter(f"{owner} has no method {attr!r}")
        else:
            handle = mnemos_app.Function(done.app.name, definition, owner)
        if handle.kind == "stream":
            async for item in handle.remote_gen.aio(*parsed_args, **parsed_kwargs):
                click.echo(item if isinstance(item, str) else json.dumps(item), nl=not isinstance(item, str))
            if obj.output == "table":
                click.echo()
        else:
            click.echo(json.dumps(await handle.remote.aio(*parsed_args, **parsed_kwargs)))

    _run(go())


def _kwarg(raw: str) -> tuple[str, Any]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"--kwarg wants key=value, got {raw!r}")
    return key, _parse_value(value)


@cli.group()
def apps() -> None:
    """The deployed apps (mnemos deploy APP.py)."""


@apps.command("ls")
@click.pass_obj
def apps_ls(obj: _Ctx) -> None:
    """List the deployed apps: live version, what they define, when deployed."""
    found = _client_call(obj, lambda c: c.apps())
    if obj.output == "json":
        click.echo(encode(found).decode())
        return
    t = _table("app", "version", "defines", "deployed", "pool", box=_simple_head(), show_edge=False)
    for rec in found:
        t.add_row(rec.name, rec.version, ", ".join(d.name for d in rec.definitions),
                  rec.deployed_at.strftime("%Y-%m-%d %H:%M:%S"), rec.pool or "-")
    console.print(t)


@apps.command("get")
@click.argument("name")
@click.pass_obj
def apps_get(obj: _Ctx, name: str) -> None:
    """One app: its live version and each function's and class's settings."""
    rec = _client_call(obj, lambda c: c.app(name))
    if obj.output == "json":
        click.echo(encode(rec).decode())
        return
    console.print(f"[bold]{rec.name}[/bold] version {rec.version} (model {rec.model}), deployed "
                  f"{rec.deployed_at:%Y-%m-%d %H:%M:%S}, previous {rec.previous_version or '-'}, pool {rec.pool}")
    t = _table("name", "kind", "calls", "timeout", "retries", "concurrency", "workers", box=_simple_head(),
              show_edge=False)
    for d in rec.definitions:
        calls = ", ".join(f"{m.name} ({m.kind}{f' x{m.max_batch_size}/{m.wait_ms:g}ms' if m.kind == 'batched' else ''})"
                          for m in d.methods) or d.function_kind
        t.add_row(d.name, d.kind, calls, f"{d.timeout:g}s", str(d.retries), str(d.max_concurrency),
                  f"{d.min_workers}-{d.max_workers}")
    console.print(t)


@cli.group()
def actors() -> None:
    """The live actor activations (apps' @app.actor classes)."""


@actors.command("ls")
@click.option("--app", "app_name", default=None, help="Only this app's actors.")
@click.pass_obj
def actors_ls(obj: _Ctx, app_name: str | None) -> None:
    """List live activations: actor, key, the worker hosting it, calls, last call."""
    found = _client_call(obj, lambda c: c.actors(app_name))
    if obj.output == "json":
        click.echo(encode(found).decode())
        return
    t = _table("app", "actor", "key", "worker", "calls", "last call", "since", box=_simple_head(), show_edge=False)
    for view in found:
        a = view.activation
        t.add_row(a.app, a.cls, a.key, a.worker_id, str(view.calls),
                  view.last_call_at.strftime("%H:%M:%S") if view.last_call_at else "-",
                  a.activated_at.strftime("%H:%M:%S"))
    console.print(t)


@cli.group()
def models() -> None:
    """The model registry."""


@models.command("ls")
@click.option("--runtime", default=None)
@click.pass_obj
def models_ls(obj: _Ctx, runtime: str | None) -> None:
    """List the registered models."""
    from mnemos.client import Client

    async def go() -> Any:
        async with await Client.connect(obj.settings) as client:
            return await client.models(runtime)

    found = _run(go())
    if obj.output == "json":
        click.echo(encode(found).decode())
        return
    t = _table("model", "runtime", "files", "size", "store", "aliases", "description")
    for m in found:
        t.add_row(m.name, m.runtime, str(len(m.files)), _human(m.total_size), m.artifact.store,
                  ",".join(m.aliases) or "-", m.description)
    console.print(t)


@models.command("push")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--family", required=True)
@click.option("--version", required=True)
@click.option("--runtime", required=True, type=click.Choice(["vllm", "transformers", "pytorch", "python"]))
@click.option("--config", "config_json", default="{}", help="Default runtime_config as JSON.")
@click.option("--alias", "aliases", multiple=True)
@click.option("--description", default="")
@click.option("--store", type=click.Choice(["nats", "s3"]), default=None, help="Default: MNEMOS_ARTIFACT_STORE.")
@click.option("--force", is_flag=True, help="Replace an existing version.")
@click.pass_obj
def models_push(obj: _Ctx, model_dir: Path, family: str, version: str, runtime: str, config_json: str,
                aliases: tuple[str, ...], description: str, store: str | None, force: bool) -> None:
    """Upload a model directory (sha256 per file) and register it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from mnemos.connection import connect
    from registry import Registry, RegistrySettings, scan_directory

    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"--config is not JSON: {e}") from e

    async def go() -> Any:
        nc = await connect(obj.settings, "mnemos-cli")
        try:
            registry = Registry(nc.jetstream(), obj.settings.names, RegistrySettings())
            await registry.start()
            files = scan_directory(model_dir)
            total = sum(f.size for f in files)
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err_console.real()) as progress:
                task = progress.add_task(f"upload {family}:{version}", total=total)
                return await registry.push(
                    model_dir, family=family, version=version, runtime=runtime, runtime_config=config,
                    aliases=list(aliases), description=description, store=store, force=force,
                    progress=lambda _path, done, _size: progress.advance(task, done),
                )
        finally:
            await nc.drain()

    record = _run(go())
    if obj.output == "json":
        click.echo(encode(record).decode())
    else:
        console.print(f"registered [bold]{record.name}[/bold] ({record.runtime}, {len(record.files)} files, "
                      f"{_human(record.total_size)}) in {record.artifact.store}://{record.artifact.bucket}")


# ---------------------------------------------------------------------------- tenants


@cli.group()
def tenants() -> None:
    """Tenants' quotas: queued and running jobs, submissions per second (the operator's)."""


def _tenant_table(obj: _Ctx, views: list[Any]) -> None:
    """Tenants' quotas: JSON (``-o json``), or a row each: use against bounds, the rate."""
    if obj.output == "json":
        click.echo(encode(views).decode())
        return
    t = _table("tenant", "queued", "running", "rate", box=_simple_head())
    for view in views:
        q = view.quota
        rate = "-" if q.submit_rate is None else f"{q.submit_rate:g}/s (burst {q.submit_burst or '-'})"
        t.add_row(q.tenant, f"{view.queued}/{'-' if q.max_queued is None else q.max_queued}",
                  f"{view.running}/{'-' if q.max_running is None else q.max_running}", rate)
    console.print(t)


@tenants.command("ls")
@click.pass_obj
def tenants_ls(obj: _Ctx) -> None:
    """Every tenant with a quota: queued and running jobs against their bounds, its rate."""
    _tenant_table(obj, _client_call(obj, lambda c: c.tenant_quotas()))


@tenants.command("get")
@click.argument("tenant")
@click.pass_obj
def tenants_get(obj: _Ctx, tenant: str) -> None:
    """A tenant's quota and its use now."""
    view = _client_call(obj, lambda c: c.tenant_quota(tenant))
    if obj.output == "json":
        click.echo(encode(view).decode())
    else:
        _tenant_table(obj, [view])


@tenants.command("set")
@click.argument("tenant")
@click.option("--max-queued", type=int, default=None, help="Jobs waiting in the queue at once.")
@click.option("--max-running", type=int, default=None, help="Jobs running at once (beyond: submissions refused).")
@click.option("--rate", "submit_rate", type=float, default=None, help="Submissions per second.")
@click.option("--burst", "submit_burst", type=int, default=None, help="Submissions at once (default: the rate).")
@click.pass_obj
def tenants_set(obj: _Ctx, tenant: str, max_queued: int | None, max_running: int | None,
                submit_rate: float | None, submit_burst: int | None) -> None:
    """Set a tenant's quota (unset bounds: none); refused submissions get quota_exceeded."""
    from mnemos.messages import SetTenant

    body = {"quota": {"type": "io.mnemos.v1.tenant_quota", "tenant": tenant, "max_queued": max_queued,
                      "max_running": max_running, "submit_rate": submit_rate, "submit_burst": submit_burst}}
    quota = _decoded(body, SetTenant).quota
    view = _client_call(obj, lambda c: c.set_tenant_quota(quota))
    _done(obj, view, f"tenant {view.quota.tenant}: quota set")


@tenants.command("rm")
@click.argument("tenant")
@click.pass_obj
def tenants_rm(obj: _Ctx, tenant: str) -> None:
    """Remove a tenant's quota (no bounds any more)."""
    view = _client_call(obj, lambda c: c.delete_tenant_quota(tenant))
    _done(obj, view, f"tenant {view.quota.tenant}: quota removed")


# ---------------------------------------------------------------------------- auth


@cli.group()
def auth() -> None:
    """NATS credentials: an operator, the accounts and a user per role (what `mnemos up` makes)."""


@auth.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.pass_obj
def auth_init(obj: _Ctx, directory: Path) -> None:
    """Keys and `server.conf` in DIRECTORY (kept if there) and a user per role for the
    namespace: include `server.conf` in nats-server's config, hand each process its file."""
    from mnemos.auth import AuthDir
    from mnemos.permissions import local_users

    store = AuthDir(directory).ensure()
    minted = {user: store.mint(user, permissions) for user, permissions in local_users(obj.settings.names).items()}
    if obj.output == "json":
        click.echo(json.dumps({"server_conf": str(store.server_conf), "creds": {u: str(p) for u, p in minted.items()}}))
        return
    console.print(f"nats-server config to include: [bold]{store.server_conf}[/bold]")
    for user, path in minted.items():
        console.print(f"  {user:<14} {path}")


@auth.command("mint")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True,
              help="The directory of `mnemos auth init` (or DATA_DIR/auth of `mnemos up`).")
@click.option("--name", default=None, help="The user's name (default: the role), e.g. service.acme.")
@click.option("--expires", "expires_s", type=int, default=None, help="Seconds until the credentials expire.")
@click.pass_obj
def auth_mint(obj: _Ctx, role: str, directory: Path, name: str | None, expires_s: int | None) -> None:
    """A credentials file for one more user of ROLE (signed by the account: no server change)."""
    from mnemos.auth import AuthDir
    from mnemos.permissions import role_permissions

    store = AuthDir(directory)
    if not store.exists:
        err_console.print(f"[red]error[/red] [bold]invalid_request[/bold]: no keys in {directory}; "
                          "run `mnemos auth init` first")
        sys.exit(EXIT_INVALID)
    user = name or role
    if user.partition(".")[0] != role:
        err_console.print(f"[red]error[/red] [bold]invalid_request[/bold]: the name {user!r} must start with {role!r}")
        sys.exit(EXIT_INVALID)
    try:
        path = store.mint(user, role_permissions(role, obj.settings.names, user=user), expires_s=expires_s)
    except ValueError as e:
        err_console.print(f"[red]error[/red] [bold]invalid_request[/bold]: {e}")
        sys.exit(EXIT_INVALID)
    click.echo(str(path))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def main() -> None:
    try:
        cli(prog_name="mnemos")
    except Exception:  # a bug or an unforeseen failure: say so, and keep 1 for "the job failed"
        err_console.print_exception(max_frames=10)
        sys.exit(EXIT_OTHER)


if __name__ == "__main__":
    main()
