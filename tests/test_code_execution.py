"""What code a job runs is fixed by its model's registration, never by the job (issue: a job
overriding ``runtime_config.entrypoint`` ran ``os:system`` on the worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from mnemos.client import Client
from mnemos.errors import OverrideRefused, UnknownFunction
from mnemos.messages import JobRecord, JobSpec, decode, encode, new_job_id, utcnow
from mnemos.names import Names
from launchers.up import LocalStack, UpOptions, child_env
from tests.conftest import assert_eventually

#: Entrypoints a job tried to run: shell, eval, subprocess, a dotted path into the standard
#: library and one into the project (the gateway's key table).
HOSTILE_ENTRYPOINTS = [
    "os:system",
    "builtins:eval",
    "subprocess:getoutput",
    "subprocess:run",
    "os.path:join",
    "control_plane.gateway.auth:ApiKeys",
    "functions.py:echo",  # even the model's own entrypoint: a job never names one
]
#: Functions a job may not pick: not declared by demo-fn (names in its module or builtins).
UNDECLARED_FUNCTIONS = ["system", "__import__", "asyncio", "Iterator", "_calls"]


def _marker_job(entrypoint: str, marker: Path) -> dict[str, Any]:
    return {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"entrypoint": entrypoint}},
            "input": {"args": [f"touch {marker}"] if entrypoint == "os:system" else ["__import__('os')"]}}


@pytest.mark.parametrize("entrypoint", HOSTILE_ENTRYPOINTS)
async def test_nats_submit_refuses_an_entrypoint_override(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, entrypoint: str, tmp_path: Path
) -> None:
    await start_worker(runtimes=["python"])
    marker = tmp_path / "ran"
    with pytest.raises(OverrideRefused) as info:
        await client.submit(decode(encode(_marker_job(entrypoint, marker)), JobSpec))
    assert info.value.code == "override_refused" and info.value.details["refused"] == ["entrypoint"]
    assert (await client.list()).jobs == []  # nothing was accepted
    assert not marker.exists()


@pytest.mark.parametrize("override", [{"threaded": False}, {"functions": ["system"]}, {"device": "cpu"}])
async def test_no_other_registered_setting_can_be_overridden(
    control_plane: Any, demo_fn: Any, client: Client, override: dict[str, Any]
) -> None:
    spec = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": override}}
    with pytest.raises(OverrideRefused):
        await client.submit(decode(encode(spec), JobSpec))


@pytest.mark.parametrize("function", UNDECLARED_FUNCTIONS)
async def test_a_job_picks_only_a_declared_function(
    control_plane: Any, demo_fn: Any, client: Client, function: str
) -> None:
    spec = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": function}}}
    with pytest.raises(UnknownFunction) as info:
        await client.submit(decode(encode(spec), JobSpec))
    assert "add" in info.value.details["declared"]


async def test_a_declared_function_runs(control_plane: Any, start_worker: Any, demo_fn: Any, client: Client) -> None:
    await start_worker(runtimes=["python"])
    spec = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "add"}},
            "input": {"args": [2, 3]}}
    done = await client.run(decode(encode(spec), JobSpec), timeout=30)
    assert done.status == "completed" and done.output is not None and done.output.result == 5


async def test_a_forged_dispatch_message_is_refused_by_the_worker(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Client, nc: Any, names: Names, tmp_path: Path
) -> None:
    """A message published straight onto the dispatch stream (not through the control plane)
    gets no further: the worker applies the same rule before it loads anything."""
    await start_worker(runtimes=["python"])
    marker = tmp_path / "ran"
    spec = decode(encode(_marker_job("os:system", marker)), JobSpec)
    now = utcnow()
    record = JobRecord(job_id=new_job_id(), status="queued", spec=spec, runtime="python", created_at=now,
                       updated_at=now)
    await nc.jetstream().publish(names.dispatch_subject("python", 5, "demo-fn", "v1"),
                                 encode({"type": "io.mnemos.v1.dispatch", "record": record, "revision": 0}))

    async def ended() -> JobRecord | None:
        try:
            got = await client.get(record.job_id)
        except Exception:  # noqa: BLE001 - not claimed yet
            return None
        return got if got.terminal else None

    done = await assert_eventually(ended, timeout=30, message="forged job not ended")
    assert done.status == "failed" and done.error is not None and done.error.code == "override_refused"
    assert not marker.exists()


# ---------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("entrypoint", HOSTILE_ENTRYPOINTS)
async def test_http_submit_refuses_an_entrypoint_override(
    control_plane: Any, start_worker: Any, start_gateway: Any, demo_fn: Any, entrypoint: str, tmp_path: Path
) -> None:
    await start_worker(runtimes=["python"])
    base = await start_gateway(api_keys="k1=acme")
    marker = tmp_path / "ran"
    async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer k1"}) as http:
        resp = await http.post("/v1/jobs?wait=5", json=_marker_job(entrypoint, marker))
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "override_refused"
        resp = await http.post("/v1/jobs", json={"model": {"family": "demo-fn", "version": "v1",
                                                           "runtime_config": {"function": "system"}}})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_function"
        assert (await http.get("/v1/jobs")).json()["jobs"] == []
    assert not marker.exists()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("entrypoint", ["os:system", "builtins:eval", "subprocess:getoutput"])
async def test_openai_routes_run_no_chosen_code(
    control_plane: Any, start_worker: Any, start_gateway: Any, demo_fn: Any, route: str, entrypoint: str,
    tmp_path: Path,
) -> None:
    await start_worker(runtimes=["python"])
    base = await start_gateway(api_keys="k1=acme")
    marker = tmp_path / "ran"
    text = {"prompt": f"touch {marker}"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": f"touch {marker}"}]}
    attempts = [
        # a python model behind the OpenAI API
        {"model": "demo-fn:v1", **text},
        # code smuggled in fields the OpenAI API does not have
        {"model": "demo-fn:v1", **text, "runtime_config": {"entrypoint": entrypoint}},
        {"model": "demo-fn:v1", **text, "entrypoint": entrypoint},
        {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"entrypoint": entrypoint}}, **text},
    ]
    async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer k1"}) as http:
        for body in attempts:
            resp = await http.post(route, json=body)
            assert resp.status_code == 422, (body, resp.text)
        assert (await http.get("/v1/jobs")).json()["jobs"] == []
    assert not marker.exists()


# ---------------------------------------------------------------------------- secrets


def test_mnemos_up_gives_no_role_the_secrets_of_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNEMOS_GATEWAY_API_KEYS", "s3cret=acme")
    monkeypatch.setenv("MNEMOS_S3_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("MNEMOS_CP_MAX_IN_FLIGHT", "100")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MNEMOS_UP_PASS_ENV", "MY_MODEL_TOKEN")
    monkeypatch.setenv("MY_MODEL_TOKEN", "for-user-code")
    stack = LocalStack(UpOptions(data_dir=tmp_path, port=0, workers=2))
    envs = {child.name: child.env for child in stack.children}
    assert set(envs) == {"control-plane", "worker-0", "worker-1", "gateway"}
    for name, env in envs.items():
        assert env["MNEMOS_NATS_URL"] and env["PATH"]
        assert "GITHUB_TOKEN" not in env
        assert ("MNEMOS_GATEWAY_API_KEYS" in env) == (name == "gateway")
        assert ("MNEMOS_S3_SECRET_ACCESS_KEY" in env) == name.startswith("worker")
        assert ("MNEMOS_CP_MAX_IN_FLIGHT" in env) == (name == "control-plane")
        assert ("MY_MODEL_TOKEN" in env) == name.startswith("worker")
    assert envs["worker-0"]["HF_HOME"] == str(tmp_path / "hf")
    assert child_env("worker", {"MNEMOS_GATEWAY_API_KEYS_FILE": "/k"}) == {}


def test_the_dockerfile_bakes_in_no_secret() -> None:
    dockerfile = (Path(__file__).parent.parent / "infra" / "docker" / "Dockerfile").read_text()
    env_lines = [line for line in dockerfile.splitlines() if line.strip().upper().startswith(("ENV", "ARG"))]
    assert not [line for line in env_lines if any(w in line.upper() for w in ("KEY", "SECRET", "TOKEN", "PASSWORD"))]
