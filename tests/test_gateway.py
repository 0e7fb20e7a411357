"""The HTTP gateway against a real control plane, worker and nats-server, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from control_plane import ControlPlane, ControlPlaneSettings
from control_plane.gateway import GatewaySettings
from control_plane.gateway.main import build_server
from launchers.cli import cli
from mnemos.config import NatsSettings
from tests.conftest import assert_eventually

StartGateway = Callable[..., Awaitable[str]]

FN = {"family": "demo-fn", "version": "v1"}
GPT = {"family": "demo-gpt2", "version": "v1"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
async def stack(control_plane: Any, start_worker: Any, demo_fn: Any, demo_model: Any,
                start_gateway: StartGateway) -> str:
    await start_worker()
    return await start_gateway()


def fn_job(function: str, *args: Any, **extra: Any) -> dict[str, Any]:
    return {"model": {**FN, "runtime_config": {"function": function}}, "input": {"args": list(args)}, **extra}


async def test_submit_wait_get(stack: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{stack}/v1/jobs", json=fn_job("add", 2, 3))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["type"] == "io.mnemos.v1.job" and job["status"] == "queued"

    done = await assert_eventually(
        lambda: _get_terminal(http, f"{stack}/v1/jobs/{job['job_id']}"), message="job finished")
    assert done["output"]["result"] == 5

    r = await http.post(f"{stack}/v1/jobs", params={"wait": 20}, json=fn_job("add", 20, 22))
    assert r.status_code == 200, r.text  # finished within wait
    assert r.json()["status"] == "completed" and r.json()["output"]["result"] == 42

    r = await http.post(f"{stack}/v1/jobs", params={"wait": 0.3}, json=fn_job("sleep", 5))
    assert r.status_code == 202, r.text  # still running when the wait ran out
    assert r.json()["status"] not in ("completed", "failed")
    await http.delete(f"{stack}/v1/jobs/{r.json()['job_id']}")


async def _get_terminal(http: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    body: dict[str, Any] = (await http.get(url)).json()
    return body if body["status"] in ("completed", "failed", "timeout", "cancelled") else None


async def test_list_filters_and_pages(stack: str, http: httpx.AsyncClient) -> None:
    ids = []
    for i in range(5):
        r = await http.post(f"{stack}/v1/jobs", params={"wait": 20}, json=fn_job("add", i, 1))
        ids.append(r.json()["job_id"])
    failed = (await http.post(f"{stack}/v1/jobs", params={"wait": 20}, json=fn_job("fail"))).json()
    assert failed["status"] == "failed"

    page = (await http.get(f"{stack}/v1/jobs", params={"status": "completed", "limit": 3})).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:3]
    rest = (await http.get(f"{stack}/v1/jobs", params={"status": "completed", "cursor": page["next_cursor"]})).json()
    assert [j["job_id"] for j in rest["jobs"]] == ids[::-1][3:] and rest["next_cursor"] is None
    only_failed = (await http.get(f"{stack}/v1/jobs", params=[("status", "failed"), ("status", "timeout")])).json()
    assert [j["job_id"] for j in only_failed["jobs"]] == [failed["job_id"]]
    by_model = (await http.get(f"{stack}/v1/jobs", params={"model": "demo-gpt2:v1"})).json()
    assert by_model["jobs"] == []


async def test_cancel_and_retry(control_plane: Any, demo_fn: Any, start_gateway: StartGateway,
                                http: httpx.AsyncClient) -> None:
    base = await start_gateway()  # no worker: the job stays queued
    job = (await http.post(f"{base}/v1/jobs", json=fn_job("add", 1, 1))).json()
    r = await http.delete(f"{base}/v1/jobs/{job['job_id']}", params={"reason": "changed my mind"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert r.json()["error"] == {"code": "cancelled", "message": "changed my mind", "retryable": False,
                                 "details": None}
    r = await http.delete(f"{base}/v1/jobs/{job['job_id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # idempotent
    r = await http.post(f"{base}/v1/jobs/{job['job_id']}/retry")
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    r = await http.post(f"{base}/v1/jobs/{job['job_id']}/retry")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"


async def test_models_and_workers(stack: str, http: httpx.AsyncClient) -> None:
    models = (await http.get(f"{stack}/v1/models")).json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["demo-gpt2:v1"]["object"] == "model" and by_id["demo-gpt2:v1"]["runtime"] == "transformers"
    assert (await http.get(f"{stack}/v1/models", params={"runtime": "python"})).json()["data"][0]["id"] == "demo-fn:v1"
    assert (await http.get(f"{stack}/v1/models/demo-fn:v1")).json()["family"] == "demo-fn"
    r = await http.get(f"{stack}/v1/models/nope:v9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    workers = (await http.get(f"{stack}/v1/workers")).json()["workers"]
    assert len(workers) == 1 and workers[0]["status"] in ("idle", "busy")


# ----------------------------------------------------------------------------- server-sent events


async def read_events(http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None,
                      stop_after: int | None = None) -> list[dict[str, Any]]:
    """Parse an SSE stream into [{"id", "event", "data"}] (comments skipped)."""
    events: list[dict[str, Any]] = []
    async with http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        async for line in r.aiter_lines():
            if line == "":
                if current:
                    events.append(current)
                    current = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    return events


async def test_events_stream_and_resume(stack: str, http: httpx.AsyncClient) -> None:
    spec = {"model": GPT, "input": {"prompt": "hello there", "parameters": {"max_tokens": 24, "temperature": 0}}}
    job = (await http.post(f"{stack}/v1/jobs", json=spec)).json()
    url = f"{stack}/v1/jobs/{job['job_id']}/events"
    events = await read_events(http, url)

    assert events[0]["event"] == "job" and "id" not in events[0]
    stream_events = events[1:]
    kinds = [e["event"] for e in stream_events]
    assert "status" in kinds and "chunk" in kinds and kinds[-1] == "final", kinds
    assert stream_events[-1]["data"]["status"] == "completed"
    ids = [int(e["id"]) for e in stream_events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    chunks = [e["data"] for e in stream_events if e["event"] == "chunk"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == stream_events[-1]["data"]["output"]["result"]

    # Reconnect after the k-th event: exactly the events after it, no snapshot.
    for k in (0, len(stream_events) // 2, len(stream_events) - 2):
        replay = await read_events(http, url, headers={"Last-Event-ID": stream_events[k]["id"]})
        assert replay == stream_events[k + 1:]

    for bad in ("not-a-number", "18446744073709551615", "99999999999999999999999", "-1", "²".encode("latin-1"), "1e3"):
        r = await http.get(url, headers={"Last-Event-ID": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", (bad, r.text)
    r = await http.get(url, headers={"Last-Event-ID": "18446744073709551614"})  # the largest: nothing after it
    assert r.status_code == 200
    r = await http.get(f"{stack}/v1/jobs/01JNOSUCHJOB00000000000000/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


async def test_events_follow_a_running_job_live(stack: str, http: httpx.AsyncClient) -> None:
    job = (await http.post(f"{stack}/v1/jobs", json=fn_job("sleep", 0.5))).json()
    events = await read_events(http, f"{stack}/v1/jobs/{job['job_id']}/events")
    assert events[0]["data"]["status"] in ("queued", "running", "loading_model")
    statuses = [e["data"]["status"] for e in events[1:] if e["event"] in ("status", "final")]
    assert statuses[-1] == "completed" and ("running" in statuses or "loading_model" in statuses), statuses


# ----------------------------------------------------------------------------- errors


async def test_error_table(stack: str, http: httpx.AsyncClient) -> None:
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/jobs", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/jobs", {"model": {**FN}, "priority": 11}, 422, "validation_error"),
        ("POST", "/v1/jobs", {"model": {"family": "nope", "version": "v1"}}, 404, "unknown_model"),
        ("POST", "/v1/jobs", {"model": {**FN, "runtime": "tpu"}}, 422, "unknown_runtime"),
        ("GET", "/v1/jobs/01JNOSUCHJOB00000000000000", None, 404, "job_not_found"),
        ("GET", "/v1/jobs/bad..id", None, 422, "validation_error"),
        ("GET", "/v1/jobs?limit=0", None, 422, "validation_error"),
        ("POST", "/v1/jobs?wait=100000", fn_job("add", 1, 2), 422, "validation_error"),
        ("DELETE", "/v1/jobs/01JNOSUCHJOB00000000000000", None, 404, "job_not_found"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("PUT", "/v1/jobs", None, 405, "method_not_allowed"),
    ]
    for method, path, body, status, code in cases:
        content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        r = await http.request(method, f"{stack}{path}", content=content,
                               headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (method, path, r.text)
        assert set(r.json()["error"]) == {"code", "message", "retryable", "details"}

    # A finished job cannot be cancelled: 409.
    done = (await http.post(f"{stack}/v1/jobs", params={"wait": 20}, json=fn_job("add", 1, 2))).json()
    r = await http.delete(f"{stack}/v1/jobs/{done['job_id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_cancellable"


async def test_body_size_limit(control_plane: Any, demo_fn: Any, start_gateway: StartGateway,
                               http: httpx.AsyncClient) -> None:
    base = await start_gateway(max_body_bytes=2048)
    big = fn_job("echo", "x" * 4096)
    r = await http.post(f"{base}/v1/jobs", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 512):
            yield data[i:i + 512]

    r = await http.post(f"{base}/v1/jobs", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = await http.post(f"{base}/v1/jobs", json=fn_job("echo", "small"))
    assert r.status_code == 202


async def test_backpressure_is_429_with_retry_after(nats_settings: NatsSettings, nc: Any, layout: Any,
                                                    demo_fn: Any, start_gateway: StartGateway,
                                                    http: httpx.AsyncClient) -> None:
    import nats

    conn = await nats.connect(nats_settings.servers)
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(max_queued_per_runtime=2,
                                                                queue_depth_refresh_s=0.05))
    await cp.start()
    try:
        base = await start_gateway(retry_after_s=3)

        async def full() -> httpx.Response | None:
            r = await http.post(f"{base}/v1/jobs", json=fn_job("add", 1, 1))
            return r if r.status_code == 429 else None

        r = await assert_eventually(full, timeout=10, message="queue_full")
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["retryable"] is True
        assert error["details"]["limit"] == 2 and error["details"]["runtime"] == "python"
        # The control plane's own estimate wins over the gateway's default (3).
        assert r.headers["retry-after"] == str(error["details"]["retry_after_s"])
    finally:
        await cp.stop()
        await conn.close()


async def test_unavailable_without_control_plane(start_gateway: StartGateway, http: httpx.AsyncClient) -> None:
    base = await start_gateway(retry_after_s=2)
    r = await http.get(f"{base}/v1/jobs/01JNOSUCHJOB00000000000000")
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert r.headers["retry-after"] == "2"
    r = await http.get(f"{base}/readyz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert (await http.get(f"{base}/healthz")).status_code == 200


# ----------------------------------------------------------------------------- tenants


async def test_tenants_see_only_their_jobs(control_plane: Any, start_worker: Any, demo_fn: Any,
                                           start_gateway: StartGateway, http: httpx.AsyncClient,
                                           tmp_path: Any) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"key-bob": "bob"}))
    await start_worker()
    base = await start_gateway(api_keys="key-alice=alice", api_keys_file=keys_file)
    alice = {"Authorization": "Bearer key-alice"}
    bob = {"Authorization": "Bearer key-bob"}

    r = await http.post(f"{base}/v1/jobs", json=fn_job("add", 1, 2))
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await http.post(f"{base}/v1/jobs", json=fn_job("add", 1, 2), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert (await http.get(f"{base}/healthz")).status_code == 200  # ops routes need no key

    job = (await http.post(f"{base}/v1/jobs", params={"wait": 20}, json=fn_job("add", 1, 2, idempotency_key="k1"),
                           headers=alice)).json()
    assert job["tenant"] == "alice" and job["status"] == "completed"
    jid = job["job_id"]
    assert (await http.get(f"{base}/v1/jobs/{jid}", headers=alice)).status_code == 200
    for method, path in [("GET", f"/v1/jobs/{jid}"), ("DELETE", f"/v1/jobs/{jid}"),
                         ("POST", f"/v1/jobs/{jid}/retry"), ("GET", f"/v1/jobs/{jid}/events")]:
        r = await http.request(method, f"{base}{path}", headers=bob)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path, r.text)
    assert [j["job_id"] for j in (await http.get(f"{base}/v1/jobs", headers=alice)).json()["jobs"]] == [jid]
    assert (await http.get(f"{base}/v1/jobs", headers=bob)).json()["jobs"] == []
    # The same idempotency key in another tenant is another job.
    bobs = (await http.post(f"{base}/v1/jobs", json=fn_job("add", 1, 2, idempotency_key="k1"), headers=bob)).json()
    assert bobs["job_id"] != jid and bobs["tenant"] == "bob"
    workers = (await http.get(f"{base}/v1/workers", headers=bob)).json()["workers"]
    assert all(w["current_jobs"] == [] for w in workers)


def test_no_keys_means_loopback_only(nats_settings: NatsSettings) -> None:
    with pytest.raises(ValueError, match="without API keys"):
        build_server(nats_settings, GatewaySettings(host="0.0.0.0"))
    build_server(nats_settings, GatewaySettings(host="0.0.0.0", api_keys="k=t"))  # keys: allowed
    build_server(nats_settings, GatewaySettings(host="::1"))  # loopback: allowed
    result = CliRunner().invoke(cli, ["--nats-url", nats_settings.nats_url, "gateway", "--host", "0.0.0.0"])
    assert result.exit_code == 4, result.output
    assert "without API keys" in result.output


# ----------------------------------------------------------------------------- ops


async def test_health_ready_metrics_openapi(stack: str, http: httpx.AsyncClient) -> None:
    assert (await http.get(f"{stack}/healthz")).json() == {"status": "ok"}
    ready = await http.get(f"{stack}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await http.post(f"{stack}/v1/jobs", params={"wait": 20}, json=fn_job("add", 1, 2))
    metrics = (await http.get(f"{stack}/metrics")).text
    assert 'mnemos_http_requests_total{method="POST",route="/v1/jobs",status="200"} 1.0' in metrics
    assert 'mnemos_http_request_duration_seconds_count{method="POST",route="/v1/jobs"} 1.0' in metrics

    doc = (await http.get(f"{stack}/openapi.json")).json()
    post = doc["paths"]["/v1/jobs"]["post"]
    body = post["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert set(body["examples"]) >= {"text", "chat", "function"}
    assert {"JobSpec", "JobRecord", "ErrorReply", "ResultChunk"} <= set(doc["components"]["schemas"])
    for path in ("/v1/jobs/{job_id}/events", "/v1/completions", "/v1/chat/completions", "/v1/models",
                 "/v1/workers", "/healthz", "/readyz", "/metrics"):
        assert path in doc["paths"], path
    assert "429" in post["responses"] and "422" in post["responses"]


async def test_concurrent_submissions_over_http(stack: str, http: httpx.AsyncClient) -> None:
    results = await asyncio.gather(*[
        http.post(f"{stack}/v1/jobs", params={"wait": 30}, json=fn_job("add", i, i)) for i in range(40)
    ])
    assert sorted(r.json()["output"]["result"] for r in results) == [2 * i for i in range(40)]


async def test_a_quiet_event_stream_gets_keep_alive_comments(control_plane: Any, start_worker: Any, demo_fn: Any,
                                                             start_gateway: StartGateway,
                                                             http: httpx.AsyncClient) -> None:
    await start_worker()
    base = await start_gateway(sse_keepalive_s=0.2)
    job = (await http.post(f"{base}/v1/jobs", json=fn_job("sleep", 1.0))).json()
    async with http.stream("GET", f"{base}/v1/jobs/{job['job_id']}/events") as r:
        body = (await r.aread()).decode()
    assert body.count(": keep-alive") >= 2, body
    assert body.rstrip().splitlines()[-1].startswith("data: ") and "event: final" in body


async def test_the_gateway_names_its_nats_connection(control_plane: Any, start_gateway: Any, nats_server: Any) -> None:
    """Operators tell the gateway from SDK users in nats-server's connection list."""
    await start_gateway()
    async with httpx.AsyncClient(timeout=10) as http:
        connz = (await http.get(f"http://127.0.0.1:{nats_server.http_port}/connz", params={"limit": 1024})).json()
    assert "mnemos-gateway" in {c.get("name") for c in connz["connections"]}
