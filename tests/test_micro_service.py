"""The control plane as a NATS micro service: what `nats micro ls/info/stats` reads is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from nats.aio.client import Client as NATS

from mnemos.endpoints import ENDPOINTS, Endpoint
from mnemos.messages import ErrorReply, decode
from mnemos.names import HDR_SERVICE_ERROR, HDR_SERVICE_ERROR_CODE, SERVICE_NAME, Names

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "nats-micro-schemas"


def _schema(name: str) -> dict:
    path = SCHEMAS / f"{name}_response.json"
    if not path.exists():
        pytest.skip(f"{path} not found (shared/ is beside the repository in CI)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("verb", ["PING", "INFO", "STATS"])
async def test_srv_replies_validate_against_micro_schemas(verb: str, control_plane, nc: NATS) -> None:
    schema = _schema(verb.lower())
    # One service instance (others may run in other test namespaces on this server).
    subject = f"$SRV.{verb}.{SERVICE_NAME}.{control_plane.service.id}"
    reply = await nc.request(subject, b"", timeout=2)
    body = json.loads(reply.data)
    jsonschema.validate(body, schema)
    assert body["name"] == SERVICE_NAME
    if verb == "INFO":
        subjects = {e["subject"] for e in body["endpoints"]}
        assert subjects == {e.subject(control_plane.names) for e in ENDPOINTS}
        assert body["metadata"]["namespace"] == control_plane.names.prefix


async def test_service_is_discoverable_by_name(control_plane, nc: NATS) -> None:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
    ids = set()
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            ids.add(json.loads(msg.data)["id"])
    except Exception:  # noqa: BLE001 - nats TimeoutError ends the collection
        pass
    assert control_plane.service.id in ids


@pytest.mark.parametrize(
    "endpoint,body,code,status",
    [
        ("jobs.submit", b"{not json", "invalid_json", "400"),
        ("jobs.submit", b'{"model": {"family": "x"}}', "validation_error", "422"),
        ("jobs.submit", b'{"model": {"family": "x", "version": "1"}, "priority": 11}', "validation_error", "422"),
        ("jobs.get", b'{"job_id": "NOPE"}', "job_not_found", "404"),
        ("jobs.get", b'{"job_id": "../../etc"}', "validation_error", "422"),
        ("models.get", b'{"name": "ghost:v9"}', "model_not_found", "404"),
        ("jobs.cancel", b"[]", "validation_error", "422"),
    ],
)
async def test_errors_use_one_envelope(
    endpoint: str, body: bytes, code: str, status: str, control_plane, nc: NATS, names: Names
) -> None:
    reply = await nc.request(names.api_subject(endpoint), body, timeout=2)
    assert reply.headers[HDR_SERVICE_ERROR_CODE] == status
    assert reply.headers[HDR_SERVICE_ERROR]
    err = decode(reply.data, ErrorReply).error
    assert err.code == code
    assert err.message


async def test_stats_count_errors_and_time(control_plane, nc: NATS, names: Names) -> None:
    for _ in range(3):
        await nc.request(names.api_subject("jobs.get"), b'{"job_id": "NOPE"}', timeout=2)
    reply = await nc.request(f"$SRV.STATS.{SERVICE_NAME}.{control_plane.service.id}", b"", timeout=2)
    [get] = [e for e in json.loads(reply.data)["endpoints"] if e["name"] == "jobs-get"]
    assert get["num_requests"] == 3 and get["num_errors"] == 3
    assert get["last_error"].startswith("job_not_found")
    assert get["processing_time"] > 0


async def test_stats_time_the_whole_request(control_plane, nc: NATS, names: Names) -> None:
    """The handler nats.micro times only starts a task: the numbers are the task's."""
    await nc.request(names.api_subject("models.list"), b"{}", timeout=2)
    reply = await nc.request(f"$SRV.STATS.{SERVICE_NAME}.{control_plane.service.id}", b"", timeout=2)
    by_name = {e["name"]: e for e in json.loads(reply.data)["endpoints"]}
    assert set(by_name) == {e.micro_name for e in ENDPOINTS}
    listed = by_name["models-list"]
    assert (listed["num_requests"], listed["num_errors"], listed["last_error"]) == (1, 0, "")
    assert listed["processing_time"] > 0 and listed["average_processing_time"] == listed["processing_time"]
    assert by_name["jobs-get"]["processing_time"] == by_name["jobs-get"]["num_requests"] == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
async def test_an_empty_body_is_taken_where_the_declaration_says(
    endpoint: Endpoint[Any, Any], control_plane, nc: NATS, names: Names
) -> None:
    reply = await nc.request(endpoint.subject(names), b"", timeout=5)
    if endpoint.body_optional:
        assert HDR_SERVICE_ERROR_CODE not in (reply.headers or {}), reply.data
        decode(reply.data, endpoint.reply)
    else:
        assert decode(reply.data, ErrorReply).error.code == "invalid_json"


async def test_oversized_request_is_rejected(control_plane, nc: NATS, names: Names) -> None:
    big = b'{"model": {"family": "x", "version": "1"}, "metadata": {"pad": "' + b"x" * 600_000 + b'"}}'
    reply = await nc.request(names.api_subject("jobs.submit"), big, timeout=5)
    assert decode(reply.data, ErrorReply).error.code == "payload_too_large"
