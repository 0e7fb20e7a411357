"""What AWS does to an Auto Scaling group's instances that moto's server does not: boot them.

moto launches an instance the moment a group's desired capacity goes up, but runs nothing
on it. :class:`BootAgent` plays each instance's boot script (``infra/terraform``'s user
data: start the worker with the environment of
:data:`control_plane.autoscaler.providers.aws.BOOT_ENV`, its id the instance id) by
starting a real ``mnemos worker`` process on this machine, and plays its shutdown when the
instance leaves the group: SIGTERM (the worker drains), then SIGKILL if it is still up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import boto3

from mnemos.config import NatsSettings
from mnemos.embedded import die_with_parent

__all__ = ["BootAgent"]

#: Lifecycle states in which an instance's boot script has run (its worker is up).
_BOOTED = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})
#: Lifecycle states in which AWS shuts the instance down (after the lifecycle hook).
_SHUT_DOWN = frozenset({"Terminating:Proceed", "Terminated"})


class BootAgent:
    """Starts one ``mnemos worker`` process per instance of ``group`` (polled every
    ``poll_interval_s``), and stops it when the instance leaves the group.

    Use as ``async with BootAgent(...) as agent:`` (or :meth:`start` / :meth:`close`).
    """

    def __init__(
        self,
        *,
        endpoint_url: str,
        group: str,
        pool: str,
        nats_settings: NatsSettings,
        workdir: Path,
        region: str = "us-east-1",
        env: Mapping[str, str] | None = None,
        poll_interval_s: float = 0.2,
        kill_after_s: float = 10.0,
    ) -> None:
        """``group``: the Auto Scaling group whose instances boot; ``pool``: the pool its
        workers name in their tags (``pool=<pool>,provider=aws``); ``workdir``: where
        worker caches and logs go; ``env``: more environment for every worker (it wins);
        ``kill_after_s``: how long a worker has to drain after SIGTERM."""
        self.group = group
        self.pool = pool
        self.workdir = workdir
        self.poll_interval_s = poll_interval_s
        self.kill_after_s = kill_after_s
        self._nats_settings = nats_settings
        self._env = dict(env or {})
        self._autoscaling = boto3.client(
            "autoscaling",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        #: Instance id -> its worker process (alive or not); an instance boots once.
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        #: Instance id -> the lifecycle state last seen (absent: not in the group).
        self.states: dict[str, str] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._sigterm_at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> BootAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start polling the group (safe to call twice)."""
        if self._task is None and not self._closed:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._task = asyncio.create_task(self._run(), name=f"boot-agent-{self.group}")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop polling; SIGTERM every worker still up, SIGKILL those not gone within
        ``timeout_s``. Re-raises what made polling fail (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        error: BaseException | None = None
        if task is not None:
            if task.done():
                error = None if task.cancelled() else task.exception()
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        alive = [(i, p) for i, p in self.processes.items() if p.poll() is None]
        for instance_id, _ in alive:
            self._signal(instance_id, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for instance_id, proc in alive:
            try:
                await asyncio.to_thread(proc.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(instance_id, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        for log in self._logs.values():
            log.close()
        self._autoscaling.close()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ state

    def alive(self) -> set[str]:
        """Instance ids whose worker process is running."""
        return {i for i, p in self.processes.items() if p.poll() is None}

    def check(self) -> None:
        """Raise what made polling fail, now (call it in a test's probes)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            if error is not None:
                raise error

    def log(self, instance_id: str) -> str:
        """What the worker of ``instance_id`` wrote so far (for assertion messages)."""
        path = self.workdir / f"{instance_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ loop

    async def _run(self) -> None:
        while True:
            self.states = await asyncio.to_thread(self._describe)
            now = time.monotonic()
            for instance_id, state in self.states.items():
                if state in _BOOTED and instance_id not in self.processes:
                    self._boot(instance_id)
            for instance_id, proc in self.processes.items():
                if proc.poll() is not None:
                    continue
                if instance_id not in self._sigterm_at:
                    if self.states.get(instance_id, "Terminated") in _SHUT_DOWN:
                        self._sigterm_at[instance_id] = now
                        self._signal(instance_id, signal.SIGTERM)
                elif now - self._sigterm_at[instance_id] > self.kill_after_s:
                    self._signal(instance_id, signal.SIGKILL)
            await asyncio.sleep(self.poll_interval_s)

    def _describe(self) -> dict[str, str]:
        groups: list[dict[str, Any]] = self._autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.group]
        )["AutoScalingGroups"]
        return {i["InstanceId"]: i["LifecycleState"] for g in groups for i in g.get("Instances", [])}

    def _boot(self, instance_id: str) -> None:
        env = dict(
            os.environ,
            MNEMOS_NATS_URL=self._nats_settings.nats_url,
            MNEMOS_NAMESPACE=self._nats_settings.namespace,
            MNEMOS_WORKER_ID=instance_id,
            MNEMOS_WORKER_TAGS=f"pool={self.pool},provider=aws",
            MNEMOS_WORKER_RUNTIMES="python",
            MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="1",
            MNEMOS_WORKER_CACHE_DIR=str(self.workdir / f"cache-{instance_id}"),
            MNEMOS_WORKER_METRICS_PORT="-1",
            MNEMOS_LOG_LEVEL="INFO",
        )
        env.update(self._env)
        log = self._logs[instance_id] = open(self.workdir / f"{instance_id}.log", "wb")  # noqa: SIM115 - closed in close()
        self.processes[instance_id] = subprocess.Popen(
            [sys.executable, "-m", "launchers", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def _signal(self, instance_id: str, sig: signal.Signals) -> None:
        proc = self.processes[instance_id]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
