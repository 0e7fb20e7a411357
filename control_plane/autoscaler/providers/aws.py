"""The ``aws`` provider: a pool is an EC2 Auto Scaling group (``infra/terraform``).

Contract with the Terraform modules (``tests/test_terraform.py`` checks that the modules
set exactly what is read here):

- The group of a pool carries the tags :data:`POOL_TAG` (the pool's name) and
  :data:`NAMESPACE_TAG` (the MNEMOS namespace). The autoscaler's IAM role may change only
  groups with :data:`NAMESPACE_TAG` set to its namespace.
- The group has a termination lifecycle hook named :data:`LIFECYCLE_HOOK`: an instance AWS
  takes away by itself (spot interruption, rebalancing, a health check) waits in
  ``Terminating:Wait`` until the autoscaler has drained its worker and completed the action.
- Each instance's boot script starts the worker container with the environment in
  :data:`BOOT_ENV`: the worker id is the instance id, and the worker's tags name its pool.

Pool ``provider_settings``: ``region`` (else the AWS environment's), ``endpoint_url``
(another endpoint, e.g. moto's server in tests), ``group`` (the group's name, when it
cannot be found by its tags).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from control_plane.autoscaler.providers.base import ProvidedWorker, ProviderError, ProviderView, WorkerLaunch
from mnemos.messages import PoolSpec

__all__ = ["POOL_TAG", "NAMESPACE_TAG", "LIFECYCLE_HOOK", "BOOT_ENV", "AwsProvider"]

#: Tag (key) on an Auto Scaling group: the MNEMOS pool it runs.
POOL_TAG = "mnemos:pool"
#: Tag (key) on an Auto Scaling group: the MNEMOS namespace it belongs to.
NAMESPACE_TAG = "mnemos:namespace"
#: Name of the group's ``autoscaling:EC2_INSTANCE_TERMINATING`` lifecycle hook.
LIFECYCLE_HOOK = "mnemos-drain"
#: Environment the boot script gives the worker container.
BOOT_ENV = (
    "MNEMOS_NATS_URL",
    "MNEMOS_NAMESPACE",
    "MNEMOS_NATS_CREDS",
    "MNEMOS_WORKER_ID",
    "MNEMOS_WORKER_TAGS",
)

log = logging.getLogger("mnemos.control_plane.autoscaler.aws")

T = TypeVar("T")

#: How long one read of a group answers :meth:`AwsProvider.list` (its own changes read anew).
DESCRIBE_TTL_S = 1.0
#: ``SetInstanceProtection`` takes at most this many instance ids.
PROTECT_BATCH = 50
#: ``DescribeInstances`` filter values per call.
_DESCRIBE_INSTANCES_BATCH = 100
#: After ``DescribeInstances`` failed (an IAM role without it), try again only this much later.
_LAUNCH_TIME_RETRY_S = 300.0
#: Bounded retries: the autoscaler itself tries again on its next tick.
_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=20)

_STARTING = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "Quarantined"})
_TERMINATING = frozenset({"Terminating", "Terminating:Wait", "Terminating:Proceed", "Detaching"})
#: States whose instance is gone, or not part of the group's capacity.
_GONE = frozenset({"Terminated", "Detached"})
#: States in which ``SetInstanceProtection`` is accepted.
_PROTECTABLE = frozenset({"InService", "EnteringStandby", "Standby"})


@dataclass(slots=True)
class _Group:
    """One read of a pool's Auto Scaling group."""

    name: str
    desired: int
    max_size: int
    #: Instance id -> the ``Instances`` entry of ``DescribeAutoScalingGroups``.
    instances: dict[str, dict[str, Any]]
    read_at: float


def _worker(instance: dict[str, Any], launched: datetime | None) -> ProvidedWorker | None:
    """The worker an Auto Scaling group instance is (None: it is gone)."""
    state = str(instance.get("LifecycleState", ""))
    if state in _GONE or state.startswith("Warmed:"):
        return None
    kind: Literal["starting", "running", "terminating"]
    if state in _STARTING:
        kind = "starting"
    elif state in _TERMINATING:
        kind = "terminating"
    else:  # InService, and Standby / EnteringStandby: an operator's, the worker runs on
        kind = "running"
    detail = f"{state}, {instance.get('HealthStatus', 'unknown health')}"
    return ProvidedWorker(worker_id=instance["InstanceId"], state=kind, started_at=launched, detail=detail)


def _counts_toward_desired(instance: dict[str, Any]) -> bool:
    state = instance.get("LifecycleState", "")
    return state in _STARTING or state == "InService"


def _batches(ids: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _message(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", "")).lower()


class AwsProvider:
    """Workers are the instances of one EC2 Auto Scaling group per pool.

    The group does the launching: :meth:`start` raises its desired capacity, its launch
    template's boot script starts a worker whose id is the instance id, and the new
    instances show up in :meth:`list`. ``launch.env`` is therefore not used here; the
    launch template (``infra/terraform``) holds the same settings. boto3 blocks, so every
    call runs in a thread; every botocore error becomes a :class:`ProviderError`.
    """

    name = "aws"

    def __init__(self, namespace: str, *, session: boto3.session.Session | None = None) -> None:
        """``namespace``: the MNEMOS namespace (the groups' :data:`NAMESPACE_TAG`);
        ``session``: the boto3 session clients come from (default: a new one, from the
        AWS environment)."""
        self.namespace = namespace
        self._session = session
        self._session_lock = threading.Lock()  # boto3 sessions may not create clients concurrently
        self._clients: dict[tuple[str, str | None, str | None], Any] = {}
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}
        #: Group key -> launch time of each of its instances (pruned at each read).
        self._launched: dict[tuple[str, ...], dict[str, datetime]] = {}
        self._launch_time_retry_at: dict[tuple[str | None, str | None], float] = {}

    # ------------------------------------------------------------------ Provider

    async def prepare(self) -> None:
        """Nothing to get ready: clients are made on first use."""

    async def start(self, launch: WorkerLaunch, count: int) -> list[str]:
        """Raise the group's desired capacity by ``count`` (at most to its ``MaxSize``)."""
        pool = launch.pool
        if count <= 0:
            return []
        async with self._lock(pool):
            group = await self._read(pool, fresh=True)
            if group.desired >= group.max_size:
                raise ProviderError(
                    f"pool {pool.name!r}: Auto Scaling group {group.name} is at its MaxSize ({group.max_size})"
                )
            desired = min(group.desired + count, group.max_size)
            client = self._client("autoscaling", pool)
            await self._aws(
                f"pool {pool.name!r}: SetDesiredCapacity of {group.name}",
                lambda: client.set_desired_capacity(
                    AutoScalingGroupName=group.name, DesiredCapacity=desired, HonorCooldown=False
                ),
            )
            self._forget(pool)
        log.info("pool %s: group %s desired capacity %d -> %d (%d asked)", pool.name, group.name, group.desired,
                 desired, count)
        return []

    async def stop(self, pool: PoolSpec, worker_id: str) -> None:
        """Terminate this instance and decrement the desired capacity; one AWS already
        takes away (``Terminating:Wait``) is let go instead (:meth:`release`)."""
        async with self._lock(pool):
            group = await self._read(pool, fresh=True)
            instance = group.instances.get(worker_id)
            state = "" if instance is None else str(instance.get("LifecycleState", ""))
            if instance is None or state in _GONE or (state in _TERMINATING and state != "Terminating:Wait"):
                log.info("pool %s: instance %s already gone (%s)", pool.name, worker_id, state or "not in the group")
                return
            if state == "Terminating:Wait":
                await self._complete(pool, group.name, worker_id)
                return
            client = self._client("autoscaling", pool)

            def terminate() -> bool:
                try:
                    client.terminate_instance_in_auto_scaling_group(
                        InstanceId=worker_id, ShouldDecrementDesiredCapacity=True
                    )
                except ClientError as e:
                    if _code(e) == "ValidationError" and "not found" in _message(e):
                        return False  # it left the group since it was read
                    raise
                return True

            done = await self._aws(f"pool {pool.name!r}: TerminateInstanceInAutoScalingGroup {worker_id}", terminate)
            self._forget(pool)
        log.info("pool %s: instance %s %s", pool.name, worker_id, "terminated" if done else "already gone")

    async def list(self, pool: PoolSpec) -> ProviderView:
        """The group's instances (read at most every :data:`DESCRIBE_TTL_S`)."""
        async with self._lock(pool):
            group = await self._read(pool)
        launched = self._launched.get(self._key(pool), {})
        workers = [w for i in group.instances.values() if (w := _worker(i, launched.get(i["InstanceId"])))]
        counted = sum(1 for i in group.instances.values() if _counts_toward_desired(i))
        return ProviderView(workers=workers, pending=max(0, group.desired - counted))

    async def protect(self, pool: PoolSpec, busy: set[str], idle: set[str]) -> None:
        """Protect busy instances from the group's scale-in and unprotect idle ones; only
        those whose protection differs from what was last read or set."""
        async with self._lock(pool):
            group = await self._read(pool)
            want = {i: False for i in idle} | {i: True for i in busy}
            changes: dict[bool, list[str]] = {True: [], False: []}
            for instance_id, protected in sorted(want.items()):
                instance = group.instances.get(instance_id)
                if instance is None or instance.get("LifecycleState") not in _PROTECTABLE:
                    continue
                if bool(instance.get("ProtectedFromScaleIn")) != protected:
                    changes[protected].append(instance_id)
            client = self._client("autoscaling", pool)
            for protected, ids in changes.items():
                for batch in _batches(ids, PROTECT_BATCH):
                    await self._aws(
                        f"pool {pool.name!r}: SetInstanceProtection of {len(batch)} instances in {group.name}",
                        partial(
                            client.set_instance_protection,
                            AutoScalingGroupName=group.name,
                            InstanceIds=batch,
                            ProtectedFromScaleIn=protected,
                        ),
                    )
                    for instance_id in batch:
                        group.instances[instance_id]["ProtectedFromScaleIn"] = protected
                    log.info(
                        "pool %s: %s from scale-in: %s",
                        pool.name,
                        "protected" if protected else "unprotected",
                        ", ".join(batch),
                    )

    async def release(self, pool: PoolSpec, worker_id: str) -> None:
        """Complete the instance's :data:`LIFECYCLE_HOOK` action (``CONTINUE``): AWS
        terminates it. One with no action waiting (gone, or timed out) is not an error."""
        async with self._lock(pool):
            group = await self._read(pool)
            await self._complete(pool, group.name, worker_id)

    async def close(self) -> None:
        """Drop the clients and what was read; the instances keep running."""
        self._clients.clear()
        self._groups.clear()
        self._launched.clear()

    # ------------------------------------------------------------------ AWS calls

    async def _complete(self, pool: PoolSpec, group: str, worker_id: str) -> None:
        client = self._client("autoscaling", pool)

        def complete() -> bool:
            try:
                client.complete_lifecycle_action(
                    LifecycleHookName=LIFECYCLE_HOOK,
                    AutoScalingGroupName=group,
                    LifecycleActionResult="CONTINUE",
                    InstanceId=worker_id,
                )
            except ClientError as e:
                if _code(e) == "ValidationError" and "no active lifecycle action" in _message(e):
                    return False
                raise
            return True

        done = await self._aws(f"pool {pool.name!r}: CompleteLifecycleAction of {worker_id} in {group}", complete)
        self._forget(pool)
        log.info("pool %s: instance %s %s", pool.name, worker_id, "released" if done else "had no lifecycle action")

    async def _read(self, pool: PoolSpec, *, fresh: bool = False) -> _Group:
        """The pool's group, as read less than :data:`DESCRIBE_TTL_S` ago unless ``fresh``."""
        key = self._key(pool)
        cached = self._groups.get(key)
        if not fresh and cached is not None and time.monotonic() - cached.read_at < DESCRIBE_TTL_S:
            return cached
        group = await self._aws(f"pool {pool.name!r}: DescribeAutoScalingGroups", partial(self._describe, pool))
        self._groups[key] = group
        return group

    def _describe(self, pool: PoolSpec) -> _Group:
        """Read the pool's group (by name, else by its tags) and its instances' launch times."""
        client = self._client("autoscaling", pool)
        paginator = client.get_paginator("describe_auto_scaling_groups")
        named = _setting(pool, "group")
        if named is not None:
            pages = paginator.paginate(AutoScalingGroupNames=[named])
            found = [g for page in pages for g in page["AutoScalingGroups"] if g["AutoScalingGroupName"] == named]
            where = f"named {named!r} (provider_settings.group)"
        else:
            tags = {POOL_TAG: pool.name, NAMESPACE_TAG: self.namespace}
            pages = paginator.paginate(Filters=[{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()])
            found = [
                g
                for page in pages
                for g in page["AutoScalingGroups"]
                if tags.items() <= {t["Key"]: t["Value"] for t in g.get("Tags", [])}.items()
            ]
            where = f"tagged {POOL_TAG}={pool.name} and {NAMESPACE_TAG}={self.namespace}"
        if not found:
            raise ProviderError(f"pool {pool.name!r}: no Auto Scaling group {where}")
        if len(found) > 1:
            names = ", ".join(sorted(g["AutoScalingGroupName"] for g in found))
            raise ProviderError(
                f"pool {pool.name!r}: {len(found)} Auto Scaling groups {where} ({names}); "
                "tag exactly one, or name it in provider_settings.group"
            )
        g = found[0]
        group = _Group(
            name=g["AutoScalingGroupName"],
            desired=int(g["DesiredCapacity"]),
            max_size=int(g["MaxSize"]),
            instances={i["InstanceId"]: i for i in g.get("Instances", [])},
            read_at=time.monotonic(),
        )
        self._read_launch_times(pool, group)
        return group

    def _read_launch_times(self, pool: PoolSpec, group: _Group) -> None:
        """Keep the launch times of the group's instances, reading those of new ones
        (``DescribeInstances``); without it (a role not allowed to) workers have no
        ``started_at``."""
        old = self._launched.get(self._key(pool), {})
        launched = self._launched[self._key(pool)] = {i: t for i, t in old.items() if i in group.instances}
        missing = [i for i in group.instances if i not in launched]
        where = (_setting(pool, "region"), _setting(pool, "endpoint_url"))
        if not missing or time.monotonic() < self._launch_time_retry_at.get(where, 0.0):
            return
        ec2 = self._client("ec2", pool)
        try:
            for batch in _batches(missing, _DESCRIBE_INSTANCES_BATCH):
                pages = ec2.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": "instance-id", "Values": batch}]
                )
                for page in pages:
                    for reservation in page["Reservations"]:
                        for instance in reservation["Instances"]:
                            if isinstance(instance.get("LaunchTime"), datetime):
                                launched[instance["InstanceId"]] = instance["LaunchTime"]
        except (ClientError, BotoCoreError, ResponseParserError) as e:
            self._launch_time_retry_at[where] = time.monotonic() + _LAUNCH_TIME_RETRY_S
            log.warning("pool %s: no launch times (DescribeInstances failed: %s)", pool.name, e)

    async def _aws(self, what: str, call: Callable[[], T]) -> T:
        """Run a blocking boto3 call in a thread; its errors become :class:`ProviderError`."""
        try:
            return await asyncio.to_thread(call)
        except ClientError as e:
            raise ProviderError(f"{what}: {e}") from e
        except (BotoCoreError, ResponseParserError) as e:  # ResponseParserError: not AWS's own answer
            raise ProviderError(f"{what}: {type(e).__name__}: {e}") from e

    def _client(self, service: str, pool: PoolSpec) -> Any:
        """The boto3 client of ``service`` for the pool's region and endpoint (made once)."""
        key = (service, _setting(pool, "region"), _setting(pool, "endpoint_url"))
        client = self._clients.get(key)
        if client is None:
            with self._session_lock:
                client = self._clients.get(key)
                if client is None:
                    if self._session is None:
                        self._session = boto3.session.Session()
                    client = self._clients[key] = self._session.client(
                        service, region_name=key[1], endpoint_url=key[2], config=_BOTO_CONFIG
                    )
        return client

    def _key(self, pool: PoolSpec) -> tuple[str, ...]:
        return (pool.name, *(_setting(pool, k) or "" for k in ("region", "endpoint_url", "group")))

    def _lock(self, pool: PoolSpec) -> asyncio.Lock:
        """One call at a time per group: a read, then the change made from it."""
        return self._locks.setdefault(self._key(pool), asyncio.Lock())

    def _forget(self, pool: PoolSpec) -> None:
        self._groups.pop(self._key(pool), None)


def _setting(pool: PoolSpec, key: str) -> str | None:
    value = pool.provider_settings.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProviderError(f"pool {pool.name!r}: provider_settings.{key} must be a string, not {value!r}")
    return value
