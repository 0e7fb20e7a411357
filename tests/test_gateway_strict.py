"""The gateway reads bodies strictly (issue: JSON taken under any content type, "yes" as a
boolean, a 100 KiB stop string, ``"content": null``, oversized chunked bodies answered 400
with tracebacks in the log)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

FN_JOB = {"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "add"}},
          "input": {"args": [2, 3]}}
COMPLETION = {"model": "demo-gpt2:v1", "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "demo-gpt2:v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
ROUTES = [("/v1/jobs", FN_JOB), ("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


@pytest.fixture
async def base(control_plane: Any, start_worker: Any, demo_fn: Any, demo_model: Any, start_gateway: Any) -> str:
    await start_worker()
    return str(await start_gateway())


@pytest.mark.parametrize(("route", "body"), ROUTES)
async def test_a_body_must_be_declared_json(base: str, route: str, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            headers = {"content-type": content_type} if content_type else {}
            r = await http.post(route, content=data, headers=headers)
            assert r.status_code == 415, (content_type, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
        r = await http.post(route, content=data, headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code in (200, 202), r.text
        assert (await http.get("/v1/jobs")).json()["jobs"][0]["status"]  # the one accepted job is listed


@pytest.mark.parametrize(("route", "body"), ROUTES[1:])
async def test_openai_bodies_are_strict(base: str, route: str, body: dict[str, Any]) -> None:
    bad = [
        {**body, "stream": "yes"},
        {**body, "temperature": "0"},
        {**body, "max_tokens": "2"},
        {**body, "stop": "x" * 100 * 1024},
        {**body, "stop": ["ok", "y" * 1001]},
        {**body, "response_format": {"type": "json_object"}},
        {**body, "made_up_field": 1},
    ]
    if route.endswith("chat/completions"):
        bad += [
            {**body, "messages": [{"role": "user", "content": None}]},
            {**body, "messages": [{"role": "user"}]},
            {**body, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        ]
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for b in bad:
            r = await http.post(route, json=b)
            assert r.status_code == 422, (b, r.text[:300])
            assert r.json()["error"]["code"] == "validation_error"
        # OpenAI's bookkeeping fields are accepted and ignored.
        ok = {**body, "user": "u1", "metadata": {"k": "v"}, "store": False, "stop": ["z" * 1000]}
        r = await http.post(route, json=ok)
        assert r.status_code == 200, r.text


async def test_a_long_stop_string_is_refused_over_nats_too(control_plane: Any, demo_model: Any, client: Any) -> None:
    from mnemos.errors import ValidationFailed
    from mnemos.messages import JobSpec, decode, encode

    spec = {"model": {"family": "demo-gpt2", "version": "v1"},
            "input": {"prompt": "x", "parameters": {"stop": ["s" * 1001]}}}
    with pytest.raises(ValidationFailed):
        await client.submit(decode(encode(spec), JobSpec))


@pytest.mark.parametrize(("route", "body"), ROUTES)
async def test_an_oversized_body_is_413_on_every_route_and_logs_nothing(
    base: str, route: str, body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    big = {**body, "padding_that_is_too_long": "p" * (2 * 2**20)}
    data = json.dumps(big).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    caplog.set_level(logging.INFO)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for content in (data, chunked()):
            r = await http.post(route, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "payload_too_large"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
