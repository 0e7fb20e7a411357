"""``mnemos up``: the whole platform on one machine, with nothing to set up.

Starts an embedded nats-server (JetStream on disk under the data directory), registers
the demo model and functions through the registry (once: a second ``up`` reuses the data
directory), writes the autoscaler pool ``local`` (every runtime a local worker runs,
``min_workers``..``max_workers`` from the options), then runs the control plane, the
autoscaler (``local`` provider: workers forked from a pre-started zygote) and the HTTP
gateway as child processes, each in its own session so that Ctrl-C reaches only this
supervisor, which stops them in order: gateway -> autoscaler -> workers (drain) ->
control plane -> nats-server.

``autoscale=False`` (the benchmarks and chaos runs) runs a fixed set of worker processes
instead, restarted when they exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnemos.auth import AuthDir
from mnemos.config import LOCAL_USER, NatsSettings
from mnemos.embedded import EmbeddedNats, die_with_parent
from mnemos.environment import CREDS_VARIABLE, child_env, passthrough_names, role_creds_variable
from mnemos.permissions import local_users
from mnemos.messages import Runtime

__all__ = ["UpOptions", "LocalStack", "run_up", "ensure_demo", "child_env"]

log = logging.getLogger("mnemos.up")

#: The roles ``mnemos up`` runs as child processes (each with its own credentials).
_CHILD_ROLES = ("control-plane", "worker", "gateway", "autoscaler")

@dataclass
class UpOptions:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    workers: int = 1
    worker_slots: int = 4
    namespace: str = "mnemos"
    #: HTTP gateway port on 127.0.0.1; 0: no gateway.
    gateway_port: int = 8080
    #: Workers from the autoscaler's pool ``local`` (``workers`` is its ``min_workers``),
    #: rather than ``workers`` fixed processes.
    autoscale: bool = False
    max_workers: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Run NATS in operator mode with a user per role (``mnemos.permissions``) and no
    #: anonymous access; off: an open server (``mnemos up --no-auth``).
    auth: bool = True
    #: Serve NATS over TLS with this certificate and key (``--tls-cert``/``--tls-key``);
    #: every process verifies it against ``tls_ca`` (default: the certificate itself,
    #: for a self-signed one).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        out.close()

    def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            proc.kill()
            proc.wait()


async def ensure_demo(settings: NatsSettings, data_dir: Path) -> list[str]:
    """Register the demo model and demo functions unless they already are."""
    from mnemos.connection import connect
    from mnemos.errors import ModelNotFound
    from registry import Registry, RegistrySettings
    from registry.demo import (
        DEMO_FUNCTIONS_CONFIG,
        DEMO_FUNCTIONS_FAMILY,
        DEMO_FUNCTIONS_VERSION,
        DEMO_MODEL_FAMILY,
        DEMO_MODEL_VERSION,
        build_demo_functions,
        build_demo_model,
    )

    nc = await connect(settings, "mnemos-up")
    try:
        registry = Registry(nc.jetstream(), settings.names, RegistrySettings(artifact_store="nats"))
        await registry.start()
        demos = [
            (DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, "transformers", build_demo_model, {},
             "Tiny random GPT-2 (demo): real tokenizer and generate, nonsense text"),
            (DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION, "python", build_demo_functions,
             DEMO_FUNCTIONS_CONFIG, "Demo Python functions: echo, add, noop, sleep, fail, ..."),
        ]
        names = []
        for family, version, runtime, build, config, description in demos:
            names.append(f"{family}:{version}")
            try:
                existing = await registry.get(f"{family}:{version}")
                if existing.runtime_config == config:
                    continue
                # Registered by an earlier release with another config (e.g. before python
                # models declared their functions): register it as this release has it.
            except ModelNotFound:
                existing = None
            src = build(data_dir / "demo" / f"{family}-{version}")
            await registry.push(src, family=family, version=version, runtime=runtime, runtime_config=config,
                                description=description, force=existing is not None)
            log.info("registered demo %s:%s", family, version)
        return names
    finally:
        await nc.drain()


#: The app ``mnemos up`` deploys (the README's first example).
DEMO_APP = Path(__file__).resolve().parents[1] / "examples" / "demo_app.py"


async def ensure_demo_app(settings: NatsSettings) -> list[str]:
    """Deploy the demo app (a no-op when this source is live); its ``app:version``."""
    from launchers.deploy import deploy

    if not DEMO_APP.is_file():  # an install without the repository's examples
        log.warning("no demo app at %s: not deployed", DEMO_APP)
        return []
    done = await deploy(settings, DEMO_APP)
    return [done.app.model]


#: The pool ``mnemos up`` runs: every runtime a local CPU worker serves (vLLM needs a GPU
#: and its own pool).
LOCAL_POOL = "local"
LOCAL_RUNTIMES: list[Runtime] = ["transformers", "pytorch", "python"]


async def ensure_local_pool(settings: NatsSettings, options: UpOptions) -> None:
    """Write the pool ``local`` with this run's bounds and slots (other settings an operator
    changed with ``mnemos pools set`` are kept)."""
    import msgspec

    from mnemos.connection import connect
    from mnemos.layout import ensure_layout
    from mnemos.messages import PoolSpec, decode, encode

    nc = await connect(settings, "mnemos-up")
    try:
        layout = await ensure_layout(nc.jetstream(), settings.names)
        try:
            pool = decode((await layout.pools.get(LOCAL_POOL)).value or b"", PoolSpec)
        except Exception:  # noqa: BLE001 - absent (or unreadable): written afresh
            pool = PoolSpec(name=LOCAL_POOL, runtimes=list(LOCAL_RUNTIMES), provider="local",
                            description="mnemos up: worker processes on this machine")
        pool = msgspec.structs.replace(pool, min_workers=options.workers,
                                       max_workers=max(options.workers, options.max_workers),
                                       worker_slots=options.worker_slots)
        await layout.pools.put(LOCAL_POOL, encode(pool))
    finally:
        await nc.drain()


async def ensure_namespace(settings: NatsSettings) -> None:
    """Create the namespace's streams and buckets unless they exist."""
    from mnemos.connection import connect
    from mnemos.layout import ensure_layout

    nc = await connect(settings, "mnemos-up")
    try:
        await ensure_layout(nc.jetstream(), settings.names)
    finally:
        await nc.drain()


async def _wait_ready(settings: NatsSettings, workers: int, timeout: float = 120.0) -> list[str]:
    from mnemos.client import Client
    from mnemos.errors import MnemosError

    deadline = time.monotonic() + timeout
    client = await Client.connect(settings)
    try:
        while True:
            try:
                found = await client.workers()
                if len(found) >= workers:
                    return [f"{w.worker_id} ({', '.join(w.runtimes)})" for w in found]
            except MnemosError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the control plane and worker did not come up; see the logs")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


def _wait_http(url: str, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready; see the gateway log")
        time.sleep(0.2)


class LocalStack:
    """Embedded NATS + control plane + workers as child processes (``mnemos up``, benchmarks)."""

    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.data_dir = options.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.auth = AuthDir(self.data_dir / "auth") if options.auth else None
        self.nats = EmbeddedNats(store_dir=self.data_dir / "nats", host=options.host, port=options.port,
                                 log_file=self.logs / "nats-server.log",
                                 include=self.auth.server_conf if self.auth else None,
                                 tls_cert=options.tls_cert, tls_key=options.tls_key)
        ca = options.tls_ca or options.tls_cert
        self.tls_ca = str(ca.resolve()) if options.tls_cert and ca else None
        env = {k: v for k, v in os.environ.items() if k != CREDS_VARIABLE}
        env.update({
            "MNEMOS_NATS_URL": self.nats.url,
            "MNEMOS_NAMESPACE": options.namespace,
            "MNEMOS_WORKER_CACHE_DIR": str(self.data_dir / "cache"),
            "MNEMOS_WORKER_MAX_CONCURRENT_JOBS": str(options.worker_slots),
            "PYTHONUNBUFFERED": "1",
        })
        if self.tls_ca is not None:
            env["MNEMOS_NATS_TLS_CA"] = self.tls_ca
        if self.auth is not None:
            env.update({role_creds_variable(role): str(self.auth.creds_path(role)) for role in _CHILD_ROLES})
        self.settings = self.settings_as(LOCAL_USER)
        env.update(options.extra_env)
        passthrough = passthrough_names(env)
        mnemos = [sys.executable, "-m", "launchers"]
        self.children = [_Child("control-plane", [*mnemos, "control-plane"], child_env("control-plane", env),
                                self.logs / "control-plane.log")]
        self.autoscaler_state = self.data_dir / "autoscaler"
        if options.autoscale:
            scaler_env = {**child_env("autoscaler", env, passthrough),
                          "MNEMOS_AUTOSCALER_STATE_DIR": str(self.autoscaler_state)}
            self.children.append(_Child("autoscaler", [*mnemos, "autoscaler"], scaler_env,
                                        self.logs / "autoscaler.log"))
        worker_env = child_env("worker", env, passthrough)
        worker_metrics = int(env.get("MNEMOS_WORKER_METRICS_PORT", "9092"))
        for i in range(0 if options.autoscale else options.workers):
            # One metrics port each (9092, 9093, ...); 0 (any free port) and -1 (off) as given.
            port = worker_metrics + i if worker_metrics > 0 else worker_metrics
            self.children.append(_Child(f"worker-{i}", [*mnemos, "worker"],
                                        {**worker_env, "MNEMOS_WORKER_METRICS_PORT": str(port)},
                                        self.logs / f"worker-{i}.log"))
        self.gateway_url: str | None = None
        if options.gateway_port:
            self.gateway_url = f"http://127.0.0.1:{options.gateway_port}"
            gateway_env = {**child_env("gateway", env), "MNEMOS_GATEWAY_HOST": "127.0.0.1",
                           "MNEMOS_GATEWAY_PORT": str(options.gateway_port)}
            # Last: stopped first, so no request arrives while the others stop.
            self.children.append(_Child("gateway", [*mnemos, "gateway"], gateway_env, self.logs / "gateway.log"))
        self.models: list[str] = []
        self.workers: list[str] = []
        self.apps: list[str] = []

    def settings_as(self, user: str) -> NatsSettings:
        """How ``user`` (a role, ``operator``, ``deploy``) reaches this stack's NATS."""
        creds = str(self.auth.creds_path(user)) if self.auth is not None else None
        return NatsSettings(nats_url=self.nats.url, namespace=self.options.namespace, nats_creds=creds,
                            nats_tls_ca=self.tls_ca)

    def start(self) -> None:
        """Start NATS, register the demo models, start the children, wait until a worker is up."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.auth is not None:
            # Minted at every start: each role's permissions are this release's.
            self.auth.ensure()
            for user, permissions in local_users(self.settings.names).items():
                self.auth.mint(user, permissions)
        self.nats.start()
        # The namespace's streams and buckets, made by the operator: the deploy user that
        # registers the demos may create only the artifacts' bucket.
        asyncio.run(ensure_namespace(self.settings))
        deploy = self.settings_as("deploy")
        self.models = asyncio.run(ensure_demo(deploy, self.data_dir))
        if self.options.autoscale:
            asyncio.run(ensure_local_pool(self.settings, self.options))
        for child in self.children:
            child.start()
        self.workers = asyncio.run(_wait_ready(self.settings, self.options.workers))
        self.apps = asyncio.run(ensure_demo_app(deploy))
        if self.gateway_url is not None:
            _wait_http(f"{self.gateway_url}/readyz")

    def supervise_once(self) -> None:
        """Restart children that exited (a recycled worker exits on purpose)."""
        for child in self.children:
            assert child.proc is not None
            rc = child.proc.poll()
            if rc is not None:
                child.restarts += 1
                print(f"{child.name} exited with {rc}; restarting (see {child.log_path})", flush=True)
                time.sleep(min(5.0, 0.5 * child.restarts))
                child.start()

    def stop(self) -> None:
        """Gateway, then the autoscaler, then the workers (they drain), then the control
        plane, then nats-server."""
        from control_plane.autoscaler.providers.local import stop_local_workers

        for child in reversed(self.children):
            child.stop(timeout=90.0 if child.name.startswith("worker") else 20.0)
            if child.name == "autoscaler":
                stop_local_workers(self.autoscaler_state / self.options.namespace, timeout=90.0)
        self.nats.stop()

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_up(options: UpOptions) -> int:
    """Run until SIGINT/SIGTERM; the exit code."""
    stop = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = LocalStack(options)
    code = 0
    try:
        stack.start()
        print(_banner(stack.nats.url, stack.data_dir, stack.workers, stack.models + stack.apps, stack.gateway_url,
                      options if options.autoscale else None), flush=True)
        while not stop["flag"]:
            stack.supervise_once()
            time.sleep(0.2)
    except Exception as e:
        print(f"mnemos up failed: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping: gateway, workers (drain), control plane, nats-server ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
    return code


def _banner(url: str, data_dir: Path, workers: list[str], models: list[str], gateway: str | None,
            autoscale: UpOptions | None = None) -> str:
    http = [] if gateway is None else [
        f"  HTTP gateway: {gateway} (OpenAPI: {gateway}/docs, metrics: {gateway}/metrics)",
    ]
    curl = [] if gateway is None else [
        f"  curl -s {gateway}/v1/completions -H 'content-type: application/json' \\",
        '       -d \'{"model": "demo-gpt2:v1", "prompt": "hello", "max_tokens": 16}\'',
    ]
    return "\n".join([
        "",
        f"MNEMOS is up. NATS {url} (JetStream data in {data_dir / 'nats'}), logs in {data_dir / 'logs'}",
        "  control plane: nats micro service 'mnemos-control-plane' on mnemos.api.*",
        *http,
        *([] if autoscale is None else [
            f"  autoscaler: pool '{LOCAL_POOL}' of local workers, {autoscale.workers} to {autoscale.max_workers} "
            f"(`mnemos pools get {LOCAL_POOL}` says what it does and why)"]),
        *[f"  worker: {w}" for w in workers],
        f"  models: {', '.join(models)}",
        "",
        "Try, in another terminal:",
        '  .venv/bin/mnemos run examples/demo_app.py::Generator.generate "Once upon a time"',
        "  .venv/bin/mnemos run examples/demo_app.py::add 2 3",
        '  .venv/bin/mnemos submit --model demo-gpt2:v1 --prompt "hello" --stream',
        "  .venv/bin/mnemos submit --model demo-fn:v1 --function add --arg 2 --arg 3 --wait",
        "  .venv/bin/mnemos jobs ls",
        *curl,
        "",
        "Ctrl-C stops everything (a second `make up` reuses the data directory).",
        "",
    ])
