"""Apps on a real stack: every call form, deploy / update / no-op, crashes and timeouts in
user code, enter once per process, batching across clients, requirements, errors.

Each test deploys an app written to its temp directory into its own namespace, with the
real control plane and a real worker whose app processes are real child processes.
"""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from launchers.deploy import deploy, load_app_file
from tests.conftest import assert_eventually
from mnemos.client import Client, job_spec
from mnemos.errors import AppNotFound, ExecutionError, Forbidden, JobTimeout, ModelLoadError, ValidationFailed
from mnemos.messages import DeployApp, RetryPolicy

async def test_every_call_form(app_stack: Any, client: Client, start_gateway: Any) -> None:
    calc = await app_stack()
    assert await calc.add.remote.aio(2, 3) == 5
    assert await asyncio.to_thread(calc.add.remote, 2, b=40) == 42  # the blocking form
    assert calc.add(1, 1) == 2  # a direct call runs here

    call = await calc.add.spawn.aio(5, 6)
    assert await call.get.aio(timeout=30) == 11
    record = await client.get(call.job_id)  # a normal job
    assert record.status == "completed" and record.spec.model.family == "calc"
    assert record.spec.model.runtime_config == {"function": "add"}
    assert record.spec.metadata["app"] == "calc"

    assert [r async for r in calc.add.map.aio([1, 3, 5], [2, 4, 6])] == [3, 7, 11]
    assert await asyncio.to_thread(lambda: list(calc.add.map(range(40), range(40), window=4))) == \
        [2 * i for i in range(40)]
    assert [r async for r in calc.add.starmap.aio([(1, 2), (3, 4)])] == [3, 7]

    assert [w async for w in calc.words.remote_gen.aio(3)] == ["w0", "w1", "w2"]
    assert await asyncio.to_thread(lambda: list(calc.ticks.remote_gen(2))) == [{"tick": 0}, {"tick": 1}]
    assert await calc.words.remote.aio(2) == ["w0", "w1"]  # remote() of a generator: all its items

    model = calc.Model()
    assert (await model.scale.remote.aio(4))[0] == 40

    base = await start_gateway()
    async with httpx.AsyncClient(base_url=base) as http:
        shown = (await http.get(f"/v1/jobs/{call.job_id}")).json()
    assert shown["status"] == "completed" and shown["output"]["result"] == 11
    listed = await client.list(model=f"calc:{record.spec.model.version}", limit=100)
    assert call.job_id in {j.job_id for j in listed.jobs}


async def test_map_keeps_the_other_results_when_one_fails(app_stack: Any) -> None:
    calc = await app_stack()
    results = [r async for r in calc.maybe_fail.map.aio([1, -2, 3], return_exceptions=True)]
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ExecutionError) and "negative: -2" in results[1].message
    assert results[1].details["exception_type"] == "ValueError"
    seen = []
    with pytest.raises(ExecutionError, match="negative"):
        async for r in calc.maybe_fail.map.aio([1, -2, 3]):
            seen.append(r)
    assert seen == [10]


async def test_spawn_cancel_and_idempotency(app_stack: Any, client: Client) -> None:
    calc = await app_stack()
    call = await calc.sleepy.spawn.aio(60)
    before = await calc.pid.remote.aio()
    await _until_running(client, call.job_id)
    await call.cancel.aio()
    record = await client.wait(call.job_id, timeout=30)
    assert record.status == "cancelled"
    # A plain function cannot be interrupted in its thread: its process was killed, and
    # the next call has a new one.
    assert await calc.pid.remote.aio() != before

    keyed = calc.add.with_options(idempotency_key="same-call")
    first = await keyed.spawn.aio(1, 2)
    second = await keyed.spawn.aio(1, 2)
    assert first.job_id == second.job_id and await second.get.aio() == 3


async def _until_running(client: Client, job_id: str) -> None:
    async def running() -> bool:
        return (await client.get(job_id)).status in ("running", "streaming")

    await assert_eventually(running, timeout=30, message=f"job {job_id} running")


async def test_a_timeout_kills_the_app_process(app_stack: Any, client: Client) -> None:
    calc = await app_stack()
    before = await calc.pid.remote.aio()
    with pytest.raises(JobTimeout):
        await calc.hang.remote.aio()
    after = await calc.pid.remote.aio()
    assert after != before
    done = await client.list(status=["timeout"], limit=10)
    assert [j.spec.model.runtime_config["function"] for j in done.jobs] == ["hang"]


@pytest.mark.parametrize("how,exit_text", [("segfault", "SIGSEGV"), ("exit", "code 3")])
async def test_a_crash_in_user_code_costs_its_process_not_the_worker(
        app_stack: Any, client: Client, how: str, exit_text: str) -> None:
    calc = await app_stack()
    before = await calc.pid.remote.aio()
    with pytest.raises(ExecutionError, match=exit_text):
        await calc.crash.remote.aio(how)
    assert await calc.add.remote.aio(1, 2) == 3  # the same worker, a new process
    assert await calc.pid.remote.aio() != before
    workers = await client.workers()
    assert len(workers) == 1 and workers[0].status in ("idle", "busy")


async def test_enter_runs_once_per_process_and_is_the_load_time(app_stack: Any, client: Client) -> None:
    calc = await app_stack()
    model = calc.Model()
    first = await model.scale.spawn.aio(1)
    results = await asyncio.gather(*(model.scale.remote.aio(i) for i in range(6)))
    assert {r[1] for r in results} == {1}  # entered once, whatever the concurrency
    assert len({r[2] for r in results}) == 1
    record = await client.wait(first.job_id, timeout=30)
    assert record.timings.load_ms is not None and record.timings.load_ms >= 300
    later = await model.scale.spawn.aio(2)
    assert (await client.wait(later.job_id, timeout=30)).timings.load_ms in (None, 0.0)


async def test_batched_calls_from_several_clients_run_as_one_batch(
        app_stack: Any, nats_settings: Any, client: Client) -> None:
    calc = await app_stack()
    model = calc.Model()
    await model.scale.remote.aio(0)  # entered: the batch below waits for nothing else
    live = await client.app("calc")
    clients = [await Client.connect(nats_settings) for _ in range(4)]
    try:
        def spec(x: int) -> Any:
            s = job_spec(live.model, runtime="python", function="Model.batch", args=[x])
            return msgspec.structs.replace(s, retry_config=RetryPolicy(max_retries=0))

        records = await asyncio.gather(*(clients[i % 4].run(spec(i)) for i in range(8)))
    finally:
        for c in clients:
            await c.close()
    assert [r.output.result for r in records] == [i + 8000 for i in range(8)]
    assert {r.output.metadata["batch_size"] for r in records} == {8}
    assert len({r.output.metadata["batch_id"] for r in records}) == 1
    # And through the handles: each caller gets its own result.
    assert sorted(await asyncio.gather(*(model.batch.remote.aio(i) for i in range(8)))) == \
        [i + 8000 for i in range(8)]


async def test_deploy_is_content_addressed_and_rolls_out_without_failing_calls(
        app_stack: Any, nats_settings: Any, client: Client, tmp_path: Path) -> None:
    calc = await app_stack(version="v1")
    first = await client.app("calc")
    again = await deploy(nats_settings, tmp_path / "calc_app.py")
    assert not again.changed and again.app.version == first.version
    models_before = {m.name for m in await client.models()}

    slow = await calc.sleepy.spawn.aio(1.5)  # in flight on the first version
    await _until_running(client, slow.job_id)
    calc2 = await app_stack(version="v2")
    second = await client.app("calc")
    assert second.version != first.version and second.previous_version == first.version
    assert await calc2.version.remote.aio() == "v2"
    assert await slow.get.aio(timeout=30) == 1.5  # finished on the version it started on
    assert {m.name for m in await client.models()} - models_before == {second.model}
    pool = await client.pool("app-calc")
    assert pool.spec.models == [second.model, first.model] and pool.spec.worker_slots == 16

    back = await app_stack(version="v1")  # a rollback: the same version again, no new upload
    assert (await client.app("calc")).version == first.version
    assert back is not None and {m.name for m in await client.models()} - models_before == {second.model}


async def test_a_call_is_retried_as_its_function_says(app_stack: Any, client: Client, tmp_path: Path) -> None:
    calc = await app_stack()
    call = await calc.flaky.spawn.aio(str(tmp_path / "attempted"))
    assert await call.get.aio(timeout=60) == "second time lucky"
    record = await client.get(call.job_id)
    assert record.attempt == 2 and record.spec.retry_config.max_retries == 2
    assert record.attempts[0].error.code == "execution_error"


async def test_a_class_that_needs_a_gpu_is_refused_on_a_worker_without_one(app_stack: Any) -> None:
    calc = await app_stack()
    with pytest.raises(ModelLoadError, match="needs a GPU"):
        await calc.NeedsGpu().run.remote.aio()


async def test_requirements_install_into_a_cached_environment(app_stack: Any, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "wheels", "mnemos_testdep", "def answer():\n    return 42\n")
    extra = '''
@app.function()
def uses_dep() -> int:
    import mnemos_testdep
    return mnemos_testdep.answer()
'''
    calc = await app_stack(requirements=[str(wheel)], extra=extra)
    assert await calc.uses_dep.remote.aio() == 42


def _wheel(directory: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel (installs offline with pip)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{info}/RECORD", record)
    return path


async def test_errors_are_the_envelope(app_stack: Any, client: Client, nats_settings: Any, tmp_path: Path) -> None:
    calc = await app_stack()
    with pytest.raises(ValidationFailed, match="arguments do not match"):
        await calc.add.remote.aio(1, 2, 3)
    with pytest.raises(ExecutionError) as raised:
        await calc.maybe_fail.remote.aio(-1)
    assert "ValueError: negative: -1" in raised.value.message
    assert "Traceback" in raised.value.details["traceback"]
    with pytest.raises(AppNotFound):
        await client.app("nope")
    with pytest.raises(Forbidden):
        await client.for_tenant("acme").deploy_app(_body(await client.app("calc")))
    bad = tmp_path / "two.py"
    bad.write_text("import mnemos\na = mnemos.App('a')\nb = mnemos.App('b')\n")
    with pytest.raises(ValidationFailed, match="exactly one"):
        load_app_file(bad)


def _body(record: Any) -> DeployApp:
    return DeployApp(name=record.name, version=record.version, definitions=record.definitions)


async def test_concurrent_first_calls_share_one_connection(nats_settings: Any) -> None:
    """App handles connect on their first call; several first calls at once on one loop share
    that connection (they opened one each, and all but one were never closed)."""
    from mnemos.app import _Connections

    connections = _Connections()
    connections.configure(nats_settings)
    clients = await asyncio.gather(*(connections.client() for _ in range(8)))
    try:
        assert len({id(c) for c in clients}) == 1
        assert await connections.client() is clients[0]
    finally:
        await clients[0].close()
    # Closed: the next call connects anew.
    again = await connections.client()
    assert again is not clients[0]
    await again.close()
