"""The OpenAI-compatible API, driven by the official ``openai`` Python client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import assert_eventually


@pytest.fixture
async def base_url(control_plane: Any, start_worker: Any, demo_model: Any, demo_fn: Any, registry: Any,
                   tiny_model_dir: Path, start_gateway: Any) -> str:
    await registry.push(tiny_model_dir, family="tiny", version="v2", runtime="transformers",
                        aliases=["tiny-latest"])
    await start_worker()
    return str(await start_gateway())


@pytest.fixture
async def oai(base_url: str) -> Any:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_completion_and_its_stream_agree(oai: openai.AsyncOpenAI) -> None:
    done = await oai.completions.create(model="demo-gpt2:v1", prompt="The quick brown fox", max_tokens=12,
                                        temperature=0)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    choice = done.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12

    stream = await oai.completions.create(model="demo-gpt2:v1", prompt="The quick brown fox", max_tokens=12,
                                          temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == choice.text  # greedy: the same text, streamed
    assert finish == "length" and usage is not None and usage.completion_tokens == 12


async def test_chat_completion_stream_and_not(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    done = await oai.chat.completions.create(model="demo-gpt2:v1", messages=messages, max_tokens=8, temperature=0)
    assert done.object == "chat.completion"
    msg = done.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert done.usage is not None and done.usage.completion_tokens == 8

    stream = await oai.chat.completions.create(model="demo-gpt2:v1", messages=messages, max_tokens=8,
                                               temperature=0, stream=True)
    roles, text, finishes = [], [], []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            text.append(delta.content)
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert roles == ["assistant"] and "".join(text) == msg.content and finishes == ["length"]


async def test_stop_top_p_seed_and_alias(oai: openai.AsyncOpenAI) -> None:
    free = await oai.completions.create(model="tiny-latest", prompt="abc", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert free.model == "tiny-latest"
    assert len(text.strip()) >= 4, text  # 16 tokens of the tiny model
    stop = text.strip()[2:4]
    cut = await oai.completions.create(model="tiny-latest", prompt="abc", max_tokens=16, temperature=0,
                                       stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert text.startswith(cut.choices[0].text)
    a = await oai.completions.create(model="demo-gpt2:v1", prompt="x", max_tokens=10, temperature=1.0, top_p=0.9,
                                     seed=7)
    b = await oai.completions.create(model="demo-gpt2:v1", prompt="x", max_tokens=10, temperature=1.0, top_p=0.9,
                                     seed=7)
    assert a.choices[0].text == b.choices[0].text  # seeded sampling repeats


async def test_errors_reach_the_openai_client(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        await oai.completions.create(model="no-such:v1", prompt="x", max_tokens=2)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError, match="n > 1"):
        await oai.completions.create(model="demo-gpt2:v1", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="text model"):
        await oai.completions.create(model="demo-fn:v1", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        await oai.chat.completions.create(model="demo-gpt2:v1", messages=[], max_tokens=2)


async def test_models_list_is_openai_shaped(oai: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in oai.models.list()]
    assert {"demo-gpt2:v1", "demo-fn:v1", "tiny:v2"} <= set(ids)
    model = await oai.models.retrieve("tiny-latest")
    assert model.id == "tiny:v2" and model.owned_by == "mnemos"


async def test_api_key_and_tenant(control_plane: Any, start_worker: Any, demo_model: Any, start_gateway: Any) -> None:
    await start_worker()
    base = await start_gateway(api_keys="sk-team-a=team-a")
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model="demo-gpt2:v1", prompt="x", max_tokens=2)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-team-a", max_retries=0) as good:
        done = await good.completions.create(model="demo-gpt2:v1", prompt="x", max_tokens=2, temperature=0)
    job_id = done.id.removeprefix("cmpl-")
    async with httpx.AsyncClient() as http:
        record = (await http.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": "Bearer sk-team-a"})).json()
    assert record["tenant"] == "team-a" and record["spec"]["metadata"]["api"] == "openai.text_completion"


async def test_a_client_that_leaves_a_stream_cancels_its_job(base_url: str) -> None:
    body = {"model": "demo-gpt2:v1", "prompt": "x", "max_tokens": 2000, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    job_id = line.split('"id":"cmpl-', 1)[1].split('"', 1)[0]
                    break
        # Disconnected: the gateway cancels the job.
        async def cancelled() -> bool:
            record = (await http.get(f"{base_url}/v1/jobs/{job_id}")).json()
            return record["status"] == "cancelled"

        await assert_eventually(cancelled, timeout=20, message="job cancelled after the client left")
