"""``mnemos up``: the whole platform on one machine, with nothing to set up.

Starts an embedded nats-server (JetStream on disk under the data directory), registers
the demo model and functions through the registry (once: a second ``up`` reuses the data
directory), then runs the control plane and a worker as child processes, each in its own
session so that Ctrl-C reaches only this supervisor, which stops them in order: workers
(drain) -> control plane -> nats-server.
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

from mnemos.config import NatsSettings
from mnemos.embedded import EmbeddedNats

__all__ = ["UpOptions", "run_up"]

log = logging.getLogger("mnemos.up")


@dataclass
class UpOptions:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    workers: int = 1
    worker_slots: int = 4
    namespace: str = "mnemos"
    extra_env: dict[str, str] = field(default_factory=dict)


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
            start_new_session=True,
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
             {"entrypoint": "functions.py:echo"}, "Demo Python functions: echo, add, noop, sleep, fail, ..."),
        ]
        names = []
        for family, version, runtime, build, config, description in demos:
            names.append(f"{family}:{version}")
            try:
                await registry.get(f"{family}:{version}")
                continue
            except ModelNotFound:
                pass
            src = build(data_dir / "demo" / f"{family}-{version}")
            await registry.push(src, family=family, version=version, runtime=runtime, runtime_config=config,
                                description=description)
            log.info("registered demo %s:%s", family, version)
        return names
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


def run_up(options: UpOptions) -> int:
    """Run until SIGINT/SIGTERM; the exit code."""
    data_dir = options.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    nats = EmbeddedNats(store_dir=data_dir / "nats", host=options.host, port=options.port,
                        log_file=logs / "nats-server.log")
    nats.start()
    settings = NatsSettings(nats_url=nats.url, namespace=options.namespace)
    env = dict(os.environ)
    env.update({
        "MNEMOS_NATS_URL": nats.url,
        "MNEMOS_NAMESPACE": options.namespace,
        "MNEMOS_WORKER_CACHE_DIR": str(data_dir / "cache"),
        "MNEMOS_WORKER_MAX_CONCURRENT_JOBS": str(options.worker_slots),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(options.extra_env)
    mnemos = [sys.executable, "-m", "mnemos"]
    children = [_Child("control-plane", [*mnemos, "control-plane"], env, logs / "control-plane.log")]
    for i in range(options.workers):
        children.append(_Child(f"worker-{i}", [*mnemos, "worker"], env, logs / f"worker-{i}.log"))
    code = 0
    try:
        models = asyncio.run(ensure_demo(settings, data_dir))
        for child in children:
            child.start()
        workers = asyncio.run(_wait_ready(settings, options.workers))
        print(_banner(nats.url, data_dir, workers, models), flush=True)
        while not stop["flag"]:
            for child in children:
                assert child.proc is not None
                rc = child.proc.poll()
                if rc is not None and not stop["flag"]:
                    child.restarts += 1
                    print(f"{child.name} exited with {rc}; restarting (see {child.log_path})", flush=True)
                    time.sleep(min(5.0, 0.5 * child.restarts))
                    child.start()
            time.sleep(0.2)
    except Exception as e:
        print(f"mnemos up failed: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping: workers (drain), control plane, nats-server ...", flush=True)
        for child in reversed(children):
            child.stop(timeout=90.0 if child.name.startswith("worker") else 20.0)
        nats.stop()
        print("stopped.", flush=True)
    return code


def _banner(url: str, data_dir: Path, workers: list[str], models: list[str]) -> str:
    return "\n".join([
        "",
        f"MNEMOS is up. NATS {url} (JetStream data in {data_dir / 'nats'}), logs in {data_dir / 'logs'}",
        "  control plane: nats micro service 'mnemos-control-plane' on mnemos.api.*",
        *[f"  worker: {w}" for w in workers],
        f"  models: {', '.join(models)}",
        "",
        "Try, in another terminal:",
        '  .venv/bin/mnemos submit --model demo-gpt2:v1 --prompt "hello" --stream',
        "  .venv/bin/mnemos submit --model demo-fn:v1 --function add --arg 2 --arg 3 --wait",
        "  .venv/bin/mnemos jobs ls",
        "",
        "Ctrl-C stops everything (a second `make up` reuses the data directory).",
        "",
    ])
