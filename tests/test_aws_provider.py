"""The ``aws`` provider against moto's server: a pool is an Auto Scaling group.

What moto (5.2) models, and so what is checked here for real: groups found by their tags,
instances launched at once when the desired capacity goes up (``InService`` from the
start: no ``Pending``), explicit termination, scale-in protection, and the group's own
scale-in taking unprotected instances only. What it does not: the termination lifecycle
hook (an instance leaves the group at once, never waiting in ``Terminating:Wait``) and
``CompleteLifecycleAction`` (HTTP 500, not implemented). For those, the tests check the
call the provider sends (recorded with botocore's own ``provide-client-params`` event), and
one test puts an instance into ``Terminating:Wait`` in moto's backend, which runs in this
process, as AWS's own scale-in would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from control_plane.autoscaler.providers import make_provider
from control_plane.autoscaler.providers.aws import LIFECYCLE_HOOK, NAMESPACE_TAG, POOL_TAG, AwsProvider
from control_plane.autoscaler.providers.base import ProviderError, ProviderView, WorkerLaunch
from mnemos.config import NatsSettings
from mnemos.embedded import free_port
from mnemos.layout import Layout
from mnemos.messages import PoolSpec, WorkerCommand, WorkerRecord, decode, encode
from mnemos.names import Names
from tests.aws_agent import BootAgent
from tests.conftest import assert_eventually

REGION = "us-east-1"


class MotoAws:
    """Auto Scaling groups of one test namespace on moto's server, made as Terraform does."""

    def __init__(self, endpoint_url: str, namespace: str) -> None:
        self.endpoint_url = endpoint_url
        self.namespace = namespace
        self.autoscaling = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint_url)
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_url)
        self.groups: list[str] = []
        self.template = f"mnemos-{namespace}"
        self.ec2.create_launch_template(
            LaunchTemplateName=self.template,
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g5.xlarge"},
        )

    def group(self, pool: str, *, max_size: int = 4, namespace: str | None = None) -> str:
        """A group tagged for ``pool`` (min 0, desired 0, new instances protected from
        scale-in) with the termination lifecycle hook."""
        name = f"mnemos-{self.namespace}-{pool}-{uuid.uuid4().hex[:4]}"
        tags = {POOL_TAG: pool, NAMESPACE_TAG: namespace or self.namespace}
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=name,
            MinSize=0,
            MaxSize=max_size,
            DesiredCapacity=0,
            LaunchTemplate={"LaunchTemplateName": self.template, "Version": "$Latest"},
            AvailabilityZones=[f"{REGION}a"],
            NewInstancesProtectedFromScaleIn=True,
            Tags=[
                {"Key": k, "Value": v, "PropagateAtLaunch": True, "ResourceId": name,
                 "ResourceType": "auto-scaling-group"}
                for k, v in tags.items()
            ],
        )
        self.autoscaling.put_lifecycle_hook(
            LifecycleHookName=LIFECYCLE_HOOK,
            AutoScalingGroupName=name,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=600,
            DefaultResult="CONTINUE",
        )
        self.groups.append(name)
        return name

    def pool(self, name: str, **settings: str) -> PoolSpec:
        return PoolSpec(
            name=name, runtimes=["python"], provider="aws",
            provider_settings={"region": REGION, "endpoint_url": self.endpoint_url, **settings},
        )

    def describe(self, group: str) -> dict[str, Any]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        assert len(groups) == 1
        return groups[0]  # type: ignore[no-any-return]

    def instances(self, group: str) -> dict[str, dict[str, Any]]:
        return {i["InstanceId"]: i for i in self.describe(group)["Instances"]}

    def desired(self, group: str) -> int:
        return int(self.describe(group)["DesiredCapacity"])

    def ec2_state(self, instance_id: str) -> str:
        reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return str(reservations[0]["Instances"][0]["State"]["Name"])

    def close(self) -> None:
        for group in self.groups:
            self.autoscaling.delete_auto_scaling_group(AutoScalingGroupName=group, ForceDelete=True)
        self.ec2.delete_launch_template(LaunchTemplateName=self.template)


class Calls:
    """The Auto Scaling calls a boto3 session's clients make (operation, parameters)."""

    def __init__(self) -> None:
        self.session = boto3.session.Session()
        self.made: list[tuple[str, dict[str, Any]]] = []
        self.session.events.register("provide-client-params.auto-scaling", self._record)

    def _record(self, params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        self.made.append((model.name, dict(params)))

    def named(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.made if name == operation]


@pytest.fixture
def aws(moto_server: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoAws]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    moto = MotoAws(moto_server, namespace)
    yield moto
    moto.close()


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
async def provider(aws: MotoAws, calls: Calls) -> Any:
    p = AwsProvider(namespace=aws.namespace, session=calls.session)
    yield p
    await p.close()


def launch(pool: PoolSpec) -> WorkerLaunch:
    return WorkerLaunch(pool=pool, env={})


def moto_lifecycle_state(group: str, instance_id: str, state: str) -> None:
    """Put an instance into ``state`` in moto's backend (its server runs in this process):
    what AWS does when its own scale-in picks an instance and the lifecycle hook holds it."""
    from moto.autoscaling.models import autoscaling_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    backend = autoscaling_backends[DEFAULT_ACCOUNT_ID][REGION]
    (instance,) = [s for s in backend.autoscaling_groups[group].instance_states if s.instance.id == instance_id]
    instance.lifecycle_state = state


# ---------------------------------------------------------------------------- finding the group


async def test_the_factory_makes_the_provider(namespace: str) -> None:
    p = make_provider("aws", namespace=namespace)
    assert isinstance(p, AwsProvider) and p.name == "aws" and p.namespace == namespace
    await p.prepare()
    await p.close()


async def test_the_group_is_found_by_its_pool_and_namespace_tags(aws: MotoAws, provider: AwsProvider) -> None:
    aws.group("other")
    aws.group("gpu", namespace=aws.namespace + "x")  # the same pool name in another namespace
    group = aws.group("gpu")
    aws.autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)
    view = await provider.list(aws.pool("gpu"))
    assert [w.worker_id for w in view.workers] == list(aws.instances(group))


async def test_a_group_named_in_the_settings_is_used(aws: MotoAws, provider: AwsProvider) -> None:
    group = aws.group("untagged", namespace="elsewhere")
    await provider.start(launch(aws.pool("gpu", group=group)), 1)
    assert aws.desired(group) == 1
    with pytest.raises(ProviderError, match="no Auto Scaling group named"):
        await provider.list(aws.pool("gpu", group=group + "-gone"))


async def test_a_pool_without_a_group_is_an_error_naming_it(aws: MotoAws, provider: AwsProvider) -> None:
    aws.group("gpu")
    with pytest.raises(ProviderError, match=r"pool 'cpu': no Auto Scaling group tagged mnemos:pool=cpu"):
        await provider.list(aws.pool("cpu"))


async def test_two_groups_with_the_same_tags_are_an_error(aws: MotoAws, provider: AwsProvider) -> None:
    first, second = aws.group("gpu"), aws.group("gpu")
    with pytest.raises(ProviderError, match="pool 'gpu': 2 Auto Scaling groups tagged") as e:
        await provider.start(launch(aws.pool("gpu")), 1)
    assert first in str(e.value) and second in str(e.value)
    assert aws.desired(first) == aws.desired(second) == 0


async def test_an_unreachable_endpoint_is_a_provider_error(aws: MotoAws, provider: AwsProvider) -> None:
    pool = aws.pool("gpu", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderError, match="EndpointConnectionError"):
        await provider.list(pool)


# ---------------------------------------------------------------------------- start, stop, list


async def test_start_raises_the_desired_capacity_and_the_instances_show_up(
    aws: MotoAws, provider: AwsProvider, calls: Calls
) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    assert await provider.list(pool) == ProviderView(workers=[], pending=0)
    assert await provider.start(launch(pool), 2) == []
    assert calls.named("SetDesiredCapacity") == [
        {"AutoScalingGroupName": group, "DesiredCapacity": 2, "HonorCooldown": False}
    ]
    view = await provider.list(pool)  # read anew after its own change
    assert {w.worker_id for w in view.workers} == set(aws.instances(group))
    assert len(view.workers) == 2 and view.pending == 0
    for w in view.workers:  # moto launches instances InService at once
        assert (w.state, w.detail) == ("running", "InService, Healthy")
        assert w.started_at is not None and w.started_at.tzinfo is not None


async def test_start_stops_at_the_group_max_size(aws: MotoAws, provider: AwsProvider) -> None:
    group, pool = aws.group("gpu", max_size=3), aws.pool("gpu")
    await provider.start(launch(pool), 2)
    await provider.start(launch(pool), 5)
    assert aws.desired(group) == 3 and len(aws.instances(group)) == 3
    with pytest.raises(ProviderError, match=r"is at its MaxSize \(3\)"):
        await provider.start(launch(pool), 1)


async def test_desired_capacity_above_the_instances_is_pending(aws: MotoAws, provider: AwsProvider) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 3)
    (first, second, third) = aws.instances(group)
    moto_lifecycle_state(group, first, "Pending")
    moto_lifecycle_state(group, second, "Terminating:Wait")  # on its way out: no longer capacity
    view = await provider.list(pool)
    assert {w.worker_id: w.state for w in view.workers} == {first: "starting", second: "terminating", third: "running"}
    assert view.pending == 1


async def test_stop_terminates_exactly_that_instance(aws: MotoAws, provider: AwsProvider, calls: Calls) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 2)
    gone, kept = sorted(aws.instances(group))
    await provider.stop(pool, gone)
    assert calls.named("TerminateInstanceInAutoScalingGroup") == [
        {"InstanceId": gone, "ShouldDecrementDesiredCapacity": True}
    ]
    assert list(aws.instances(group)) == [kept] and aws.desired(group) == 1
    assert aws.ec2_state(gone) in ("shutting-down", "terminated")
    assert [w.worker_id for w in (await provider.list(pool)).workers] == [kept]
    await provider.stop(pool, gone)  # gone: not an error, and nothing is sent
    await provider.stop(pool, "i-0123456789abcdef0")
    assert len(calls.named("TerminateInstanceInAutoScalingGroup")) == 1
    assert list(aws.instances(group)) == [kept] and aws.desired(group) == 1


# ---------------------------------------------------------------------------- protection


async def test_protect_flips_only_what_differs(aws: MotoAws, provider: AwsProvider, calls: Calls) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 2)
    a, b = sorted(aws.instances(group))
    assert all(i["ProtectedFromScaleIn"] for i in aws.instances(group).values())  # the group's default

    await provider.protect(pool, busy={a}, idle={b, "i-notinthisgroup"})
    assert {i: s["ProtectedFromScaleIn"] for i, s in aws.instances(group).items()} == {a: True, b: False}
    assert calls.named("SetInstanceProtection") == [
        {"AutoScalingGroupName": group, "InstanceIds": [b], "ProtectedFromScaleIn": False}
    ]
    await provider.protect(pool, busy={a}, idle={b})  # as already set: no call
    assert len(calls.named("SetInstanceProtection")) == 1

    await provider.protect(pool, busy={b}, idle={a})
    assert {i: s["ProtectedFromScaleIn"] for i, s in aws.instances(group).items()} == {a: False, b: True}
    assert len(calls.named("SetInstanceProtection")) == 3


async def test_protect_sends_at_most_50_ids_a_call(aws: MotoAws, provider: AwsProvider, calls: Calls) -> None:
    group, pool = aws.group("gpu", max_size=60), aws.pool("gpu")
    await provider.start(launch(pool), 55)
    ids = set(aws.instances(group))
    await provider.protect(pool, busy=set(), idle=ids)
    sent = calls.named("SetInstanceProtection")
    assert sorted(len(c["InstanceIds"]) for c in sent) == [5, 50]
    assert not any(i["ProtectedFromScaleIn"] for i in aws.instances(group).values())


async def test_the_groups_own_scale_in_takes_only_unprotected_instances(aws: MotoAws, provider: AwsProvider) -> None:
    """moto: lowering the desired capacity removes unprotected instances at once (AWS would
    first hold them in ``Terminating:Wait`` with the lifecycle hook)."""
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 3)
    busy, idle, idle2 = sorted(aws.instances(group))
    await provider.protect(pool, busy={busy}, idle={idle, idle2})
    aws.autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)

    async def only_busy_left() -> bool:
        view = await provider.list(pool)
        return [(w.worker_id, w.state) for w in view.workers] == [(busy, "running")] and view.pending == 0

    await assert_eventually(only_busy_left, timeout=5, message="the busy instance alone in the view")
    assert aws.ec2_state(idle) in ("shutting-down", "terminated")


async def test_an_instance_ec2_terminates_leaves_the_view(aws: MotoAws, provider: AwsProvider) -> None:
    """moto: an instance terminated outside the group (a spot interruption) leaves it at once
    and the group launches a replacement; AWS would hold it in ``Terminating:Wait``."""
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 2)
    lost, kept = sorted(aws.instances(group))
    aws.ec2.terminate_instances(InstanceIds=[lost])

    async def replaced() -> set[str]:
        ids = {w.worker_id for w in (await provider.list(pool)).workers}
        return ids if lost not in ids and kept in ids and len(ids) == 2 else set()

    await assert_eventually(replaced, timeout=5, message="the lost instance replaced in the view")


# ---------------------------------------------------------------------------- lifecycle hook


async def test_release_completes_the_lifecycle_action(aws: MotoAws, provider: AwsProvider, calls: Calls) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 1)
    (instance,) = aws.instances(group)
    # moto 5.2 does not implement CompleteLifecycleAction (HTTP 500): the error comes back
    # as a ProviderError, never as a botocore exception.
    try:
        await provider.release(pool, instance)
    except ProviderError as e:
        assert "CompleteLifecycleAction" in str(e) and instance in str(e)
    assert calls.named("CompleteLifecycleAction") == [{
        "LifecycleHookName": LIFECYCLE_HOOK, "AutoScalingGroupName": group,
        "LifecycleActionResult": "CONTINUE", "InstanceId": instance,
    }]


async def test_an_instance_aws_takes_is_terminating_and_stop_releases_it(
    aws: MotoAws, provider: AwsProvider, calls: Calls
) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")
    await provider.start(launch(pool), 2)
    taken, kept = sorted(aws.instances(group))
    moto_lifecycle_state(group, taken, "Terminating:Wait")

    async def terminating() -> bool:
        states = {w.worker_id: (w.state, w.detail) for w in (await provider.list(pool)).workers}
        return states == {taken: ("terminating", "Terminating:Wait, Healthy"), kept: ("running", "InService, Healthy")}

    await assert_eventually(terminating, timeout=5, message="the taken instance terminating")
    await provider.protect(pool, busy=set(), idle={taken, kept})  # a terminating instance is left alone
    assert [c["InstanceIds"] for c in calls.named("SetInstanceProtection")] == [[kept]]

    try:  # the cloud takes it: stop lets it go rather than terminating it a second time
        await provider.stop(pool, taken)
    except ProviderError as e:  # moto: CompleteLifecycleAction not implemented
        assert "CompleteLifecycleAction" in str(e)
    assert calls.named("TerminateInstanceInAutoScalingGroup") == []
    assert [c["InstanceId"] for c in calls.named("CompleteLifecycleAction")] == [taken]


# ---------------------------------------------------------------------------- with real workers


async def test_a_booted_instance_registers_its_worker_and_stop_removes_exactly_it(
    aws: MotoAws, provider: AwsProvider, nats_settings: NatsSettings, layout: Layout, names: Names, nc: NATS,
    tmp_path: Path,
) -> None:
    group, pool = aws.group("gpu"), aws.pool("gpu")

    async def record(worker_id: str) -> WorkerRecord | None:
        try:
            entry = await layout.workers.get(worker_id)
        except KeyNotFoundError:
            return None
        return decode(entry.value or b"", WorkerRecord)

    async with BootAgent(
        endpoint_url=aws.endpoint_url, group=group, pool=pool.name, nats_settings=nats_settings,
        workdir=tmp_path / "instances",
    ) as agent:
        await provider.start(launch(pool), 2)
        view = await provider.list(pool)
        drained, kept = sorted(w.worker_id for w in view.workers)

        async def idle(worker_id: str) -> WorkerRecord | None:
            rec = await record(worker_id)
            return rec if rec is not None and rec.status == "idle" else None

        for instance in (drained, kept):
            rec = await assert_eventually(partial(idle, instance), timeout=60, message=f"worker {instance} idle")
            assert rec.worker_id == instance
            assert rec.tags["pool"] == pool.name and rec.tags["provider"] == "aws"

        reply = await nc.request(
            names.worker_control_subject(drained), encode(WorkerCommand(command="drain")), timeout=10
        )
        assert decode(reply.data, WorkerRecord).worker_id == drained

        async def deregistered(worker_id: str) -> bool:
            agent.check()
            return await record(worker_id) is None

        await assert_eventually(partial(deregistered, drained), timeout=30, message=f"worker {drained} deregistered")

        await provider.stop(pool, drained)
        assert list(aws.instances(group)) == [kept] and aws.desired(group) == 1
        await assert_eventually(lambda: drained not in agent.alive(), timeout=15, message="its process gone")
        assert kept in agent.alive() and await record(kept) is not None
        assert [w.worker_id for w in (await provider.list(pool)).workers] == [kept]

        # Stopped without a drain first: the instance's shutdown (SIGTERM) drains its worker.
        await provider.stop(pool, kept)
        await assert_eventually(partial(deregistered, kept), timeout=30, message=f"worker {kept} deregistered")
        await assert_eventually(lambda: not agent.alive(), timeout=15, message="every worker process gone")
        assert agent.processes[kept].returncode == 0 and aws.desired(group) == 0


# ---------------------------------------------------------------------------- the autoscaler drives the group


async def test_the_autoscaler_scales_a_group_with_real_workers_and_loses_no_job(
    aws: MotoAws, calls: Calls, control_plane: Any, client: Any, demo_fn: Any, nats_settings: NatsSettings,
    layout: Layout, tmp_path: Path,
) -> None:
    """From zero: jobs raise the group's desired capacity, the boot agent starts a worker per
    instance (the instance id is the worker id), busy instances are protected from scale-in
    and idle ones not, and after the window each idle worker is drained and exactly its
    instance terminated with the desired capacity decremented. An instance AWS takes away
    by itself (``Terminating:Wait``) while it runs a job is drained first: the job ends
    on it, and the lifecycle action is completed after the worker deregistered."""
    import nats as nats_py
    import msgspec

    from control_plane.autoscaler import Autoscaler, AutoscalerSettings
    from mnemos.messages import JobInput, JobSpec, ModelRef, PoolStatus

    group = aws.group("gpu")
    pool = msgspec.structs.replace(aws.pool("gpu"), max_workers=3, worker_slots=1, scaledown_window_s=0.5)
    await client.set_pool(pool)
    conn = await nats_py.connect(nats_settings.servers, name="pytest-autoscaler-aws")
    scaler = Autoscaler(
        conn, nats_settings,
        AutoscalerSettings(instance_id="aws-1", metrics_port=0, tick_s=0.1, lease_ttl_s=2.0, lease_renew_s=0.5,
                           state_dir=tmp_path / "autoscaler"),
        provider_factory=lambda name: AwsProvider(namespace=nats_settings.namespace, session=calls.session),
    )

    def job(seconds: float) -> JobSpec:
        return JobSpec(model=ModelRef(family="demo-fn", version="v1", runtime_config={"function": "sleep"}),
                       input=JobInput(args=[seconds]))

    async def status() -> PoolStatus | None:
        try:
            return decode((await layout.autoscaler.get(Names.pool_status_key("gpu"))).value or b"", PoolStatus)
        except Exception:  # noqa: BLE001 - not written yet
            return None

    async with BootAgent(
        endpoint_url=aws.endpoint_url, group=group, pool="gpu", nats_settings=nats_settings,
        workdir=tmp_path / "instances", env={"MNEMOS_WORKER_MAX_CONCURRENT_JOBS": "1"},
    ) as agent:
        await scaler.start()
        try:
            jobs = [await client.submit(job(1.5)) for _ in range(2)]
            done = [await client.wait(j.job_id, timeout=90) for j in jobs]
            assert [(d.status, len(d.attempts)) for d in done] == [("completed", 1), ("completed", 1)]
            ran_on = {d.worker_id for d in done}
            assert ran_on <= set(agent.processes)  # the workers are the instances

            # Scaled in: every idle worker drained, exactly its instance terminated.
            await assert_eventually(lambda: aws.desired(group) == 0 and not aws.instances(group), timeout=60,
                                    message="the group scaled in to zero")
            terminated = calls.named("TerminateInstanceInAutoScalingGroup")
            assert terminated and all(c["ShouldDecrementDesiredCapacity"] is True for c in terminated)
            assert {c["InstanceId"] for c in terminated} == set(agent.processes)
            protections = calls.named("SetInstanceProtection")
            assert any(c["ProtectedFromScaleIn"] is False for c in protections)  # idle: AWS may take it
            st = await status()
            assert st is not None and [d.action for d in st.decisions].count("scale_up") >= 1

            # AWS takes an instance that runs a job: drained first, the job ends there.
            long = await client.submit(job(3.0))
            await assert_eventually(lambda: _is_running(client, long.job_id), timeout=60, message="long job running")
            holder = (await client.get(long.job_id)).worker_id
            assert holder is not None
            moto_lifecycle_state(group, holder, "Terminating:Wait")
            finished = await client.wait(long.job_id, timeout=60)
            assert finished.status == "completed" and len(finished.attempts) == 1 and finished.worker_id == holder

            async def released() -> bool:
                return holder in [c["InstanceId"] for c in calls.named("CompleteLifecycleAction")]

            await assert_eventually(released, timeout=30, message="lifecycle action completed after the drain")
            st = await status()
            assert st is not None
            assert any(d.action == "drain" and holder in d.asked for d in st.decisions), st.decisions
        finally:
            await scaler.stop()
            await conn.close()


async def _is_running(client: Any, job_id: str) -> bool:
    return bool((await client.get(job_id)).status == "running")
