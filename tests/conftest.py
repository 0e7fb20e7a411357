"""Shared fixtures: a real nats-server per test session, a fresh namespace per test.

Tests isolate themselves by namespace (``t<hex>`` prefixes every subject, stream and
bucket), like Temporal's uuid task queue per test, instead of restarting servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mnemos.config import NatsSettings
from mnemos.embedded import EmbeddedNats, die_with_parent, free_port
from mnemos.layout import Layout, ensure_layout
from mnemos.names import Names

T = TypeVar("T")

# Every control plane and worker a test starts (here or in a test file) serves metrics on a
# port the OS picks, so tests, and test runs side by side, never compete for 9091/9092.
os.environ["MNEMOS_CP_METRICS_PORT"] = "0"
os.environ["MNEMOS_WORKER_METRICS_PORT"] = "0"
os.environ["MNEMOS_AUTOSCALER_METRICS_PORT"] = "0"


async def assert_eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> T:
    """Call ``probe`` until it returns a truthy value (returned) or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last  # type: ignore[no-any-return]
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


async def answers_on(nc: NATS) -> tuple[str, asyncio.Queue[Msg]]:
    """A fresh inbox subscribed on ``nc`` and the queue of every message it receives (to
    publish a request with it as the reply subject and see each answer, not only the first)."""
    inbox = nc.new_inbox()
    answers: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        answers.put_nowait(msg)

    await nc.subscribe(inbox, cb=collect)
    return inbox, answers


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp("jetstream")
    server = EmbeddedNats(store_dir=store, port=free_port(), log_file=store / "nats.log", http_port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def names(namespace: str) -> Names:
    return Names(namespace)


@pytest.fixture
def nats_settings(nats_server: EmbeddedNats, namespace: str) -> NatsSettings:
    return NatsSettings(nats_url=nats_server.url, namespace=namespace)


@pytest.fixture
async def nc(nats_settings: NatsSettings) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_settings.servers, name="pytest")
    yield client
    await client.close()


@pytest.fixture
async def layout(nc: NATS, names: Names) -> AsyncIterator[Layout]:
    js = nc.jetstream()
    lay = await ensure_layout(js, names)
    yield lay
    await _bounded(drop_namespace(nc, names), "namespace cleanup")


async def _bounded(step: Awaitable[Any], what: str, timeout: float = 30.0) -> None:
    """Run a teardown step with a deadline, so one stuck step names itself instead of
    hanging the session."""
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        import warnings

        warnings.warn(f"teardown: {what} did not finish within {timeout}s", stacklevel=2)


async def drop_namespace(nc: NATS, names: Names) -> None:
    """Delete every stream of a test namespace so the shared server stays small."""
    js = nc.jetstream()
    for stream in await js.streams_info():
        n = stream.config.name
        p = names.prefix
        if n in (names.dispatch_stream, names.results_stream) or n.startswith(f"KV_{p}_") or n.startswith(
            f"OBJ_{p}_"
        ):
            try:
                await js.delete_stream(n)
            except Exception:  # noqa: BLE001 - best effort cleanup of a test namespace
                pass


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 API (moto's server) on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2-style model with random weights and a tokenizer built with `tokenizers`."""
    from registry.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def demo_functions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo Python functions as a model directory (``functions.py``)."""
    from registry.demo import build_demo_functions

    return build_demo_functions(tmp_path_factory.mktemp("demo-functions"))


# ---------------------------------------------------------------------------- platform fixtures


@pytest.fixture
async def registry(nc: NATS, names: Names, layout: Layout) -> Any:
    from registry import Registry, RegistrySettings

    reg = Registry(nc.jetstream(), names, RegistrySettings(artifact_store="nats"))
    await reg.start()
    return reg


@pytest.fixture
async def demo_fn(registry: Any, demo_functions_dir: Path) -> Any:
    """The demo functions registered as ``demo-fn:v1`` (python runtime)."""
    from registry.demo import DEMO_FUNCTIONS_CONFIG

    return await registry.push(
        demo_functions_dir, family="demo-fn", version="v1", runtime="python", runtime_config=DEMO_FUNCTIONS_CONFIG,
    )


@pytest.fixture
async def demo_model(registry: Any, tiny_model_dir: Path) -> Any:
    """The tiny GPT-2 registered as ``demo-gpt2:v1`` (transformers runtime)."""
    return await registry.push(tiny_model_dir, family="demo-gpt2", version="v1", runtime="transformers")


@pytest.fixture
async def control_plane(nats_settings: NatsSettings, layout: Layout) -> AsyncIterator[Any]:
    from control_plane import ControlPlane, ControlPlaneSettings

    conn = await nats.connect(nats_settings.servers, name="pytest-control-plane")
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings())
    await cp.start()
    yield cp
    await _bounded(cp.stop(), "control plane stop")
    await _bounded(conn.close(), "connection close")


@pytest.fixture
async def start_worker(
    nats_settings: NatsSettings, layout: Layout, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start workers (each with its own NATS connection); all drained at teardown."""
    from neuron_runtime import Worker, WorkerSettings

    started: list[tuple[Any, NATS]] = []

    async def start(**overrides: Any) -> Any:
        n = len(started)
        options: dict[str, Any] = dict(
            worker_id=f"w{n}-{uuid.uuid4().hex[:6]}",
            runtimes=["python", "transformers", "pytorch"],
            max_concurrent_jobs=4,
            heartbeat_interval_s=1.0,
            cache_dir=tmp_path / f"cache-{n}",
            drain_timeout_s=5.0,
        )
        options.update(overrides)
        conn = await nats.connect(nats_settings.servers, name=f"pytest-worker-{n}")
        worker = Worker(conn, nats_settings, WorkerSettings(**options))
        await worker.start()
        started.append((worker, conn))
        return worker

    yield start
    for worker, conn in reversed(started):
        await _bounded(worker.drain(), f"drain of {worker.worker_id}")
        await _bounded(conn.close(), "connection close")


@pytest.fixture
async def client(nc: NATS, names: Names) -> Any:
    from mnemos.client import Client

    return Client(nc, names)


@pytest.fixture
async def start_gateway(nats_settings: NatsSettings, layout: Layout) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start HTTP gateways (real uvicorn on a free loopback port, in this event loop); each
    returns its base URL. Keyword arguments are ``GatewaySettings`` fields. Request the
    ``control_plane`` fixture too, unless the test is about its absence."""
    from control_plane.gateway import GatewaySettings, create_app
    from mnemos.asgi import AsgiServer

    servers: list[AsgiServer] = []

    async def start(**overrides: Any) -> str:
        settings = GatewaySettings(**{"host": "127.0.0.1", "port": 0, **overrides})
        server = AsgiServer(create_app(settings, nats_settings), settings.host, settings.port, lifespan="on")
        await server.start()
        servers.append(server)
        return f"http://{settings.host}:{server.port}"

    yield start
    for server in servers:
        await _bounded(server.stop(), "gateway stop")


@pytest.fixture
def worker_process(nats_settings, tmp_path: Path) -> Iterator:
    """Start `mnemos worker` processes (python runtime only, 1 s heartbeats); killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(worker_id: str, **env: str) -> subprocess.Popen:
        e = dict(os.environ, MNEMOS_NATS_URL=nats_settings.nats_url, MNEMOS_NAMESPACE=nats_settings.namespace,
                 MNEMOS_WORKER_ID=worker_id, MNEMOS_WORKER_RUNTIMES="python",
                 MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="1", MNEMOS_WORKER_CACHE_DIR=str(tmp_path / worker_id),
                 MNEMOS_LOG_LEVEL="INFO")
        e.update(env)
        log = open(tmp_path / f"{worker_id}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "launchers", "worker"], env=e, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
async def app_stack(nats_settings: Any, control_plane: Any, start_worker: Any, tmp_path: Path
                    ) -> AsyncIterator[Callable[..., Any]]:
    """``up(**app_options)`` deploys the app (tests/appkit.py) and returns its module;
    the handles call this namespace; the first ``up`` starts ``workers`` in-process
    workers (python runtime, 16 slots)."""
    import mnemos

    mnemos.configure(nats_settings)
    started = False

    async def up(workers: int = 1, **app_options: Any) -> Any:
        nonlocal started
        from launchers.deploy import deploy, load_app_file
        from tests.appkit import write_app

        path = write_app(tmp_path, **app_options)
        await deploy(nats_settings, path)
        if not started:
            for _ in range(workers):
                await start_worker(runtimes=["python"], max_concurrent_jobs=16)
            started = True
        return load_app_file(path).module

    yield up
    mnemos.configure(None)
