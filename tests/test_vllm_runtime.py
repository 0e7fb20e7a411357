"""The vLLM runtime against FakeAsyncLLMEngine (here) and the real engine (on a CUDA GPU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mnemos.errors import ModelLoadError, ValidationFailed
from mnemos.messages import ArtifactLocation, GenerationParams, JobInput, JobSpec, ModelRecord, ModelRef
from mnemos.runtime_config import VLLMConfig
from neuron_runtime.runtimes import ExecutionContext, VLLMModel, VLLMRuntime
from registry.demo import DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION
from tests.conftest import assert_eventually
from tests.fakes.fake_vllm import FakeAsyncEngineArgs, FakeAsyncLLMEngine, FakeSamplingParams

PROMPT = "stream some words please"
RECORD = ModelRecord(
    family=DEMO_MODEL_FAMILY,
    version=DEMO_MODEL_VERSION,
    runtime="vllm",
    artifact=ArtifactLocation(store="nats", bucket="x", prefix="p"),
    files=[],
    total_size=0,
    created_at=datetime.now(UTC),
)


class Job:
    """An execution context plus the text it streamed."""

    _n = 0

    def __init__(self, prompt: str | None = PROMPT, **params: Any) -> None:
        Job._n += 1
        self.texts: list[str] = []
        self.ctx = ExecutionContext(
            job_id=f"vjob{Job._n}",
            attempt=2,
            spec=JobSpec(
                model=ModelRef(family=DEMO_MODEL_FAMILY, version=DEMO_MODEL_VERSION),
                input=JobInput(prompt=prompt, parameters=GenerationParams(**params)),
            ),
            sink=lambda text, data: self.texts.append(text),
        )

    @property
    def request_id(self) -> str:
        return f"{self.ctx.job_id}-{self.ctx.attempt}"


def fake_runtime(**engine_options: Any) -> VLLMRuntime:
    return VLLMRuntime(
        engine_factory=lambda kw: FakeAsyncLLMEngine.from_engine_args(FakeAsyncEngineArgs(**kw), **engine_options),
        sampling_params_factory=FakeSamplingParams,
    )


@pytest.fixture
async def model(tiny_model_dir: Path) -> AsyncIterator[VLLMModel]:
    loaded = await fake_runtime().load(RECORD, tiny_model_dir, VLLMConfig(max_num_seqs=8))
    yield loaded
    await loaded.unload()


def engine(model: VLLMModel) -> FakeAsyncLLMEngine:
    assert isinstance(model.engine, FakeAsyncLLMEngine)
    return model.engine


def expected_text(prompt: str, max_tokens: int, **params: Any) -> str:
    words = FakeAsyncLLMEngine.expected_words(prompt, FakeSamplingParams(max_tokens=max_tokens, **params))
    return "".join(" " + w for w in words)


async def test_engine_gets_the_local_model_and_config(model: VLLMModel, tiny_model_dir: Path) -> None:
    args = engine(model).args
    assert args.model == args.tokenizer == str(tiny_model_dir)
    assert args.max_num_seqs == 8 and args.dtype == "auto" and args.gpu_memory_utilization == 0.9
    assert model.max_concurrency == 8
    assert model.memory_bytes > 0


async def test_streams_deltas_that_join_to_the_result(model: VLLMModel) -> None:
    job = Job(max_tokens=12)
    out = await model.run(job.ctx)
    assert out.result == expected_text(PROMPT, 12)
    assert len(job.texts) == 12 and all(job.texts)
    assert "".join(job.texts) == out.result
    meta = out.metadata
    assert meta["finish_reason"] == "length"
    assert meta["completion_tokens"] == 12
    assert meta["prompt_tokens"] == len(PROMPT.split())
    assert meta["total_tokens"] == meta["prompt_tokens"] + 12
    assert meta["request_id"] == job.request_id
    assert out.metrics["tokens_per_second"] > 0


async def test_stop_string_spanning_tokens_never_streams(model: VLLMModel) -> None:
    words = FakeAsyncLLMEngine.expected_words(PROMPT, FakeSamplingParams(max_tokens=30))
    stop = f"{words[5]} {words[6][:2]}"
    full = expected_text(PROMPT, 30)
    job = Job(max_tokens=30, stop=[stop])
    out = await model.run(job.ctx)
    assert out.result == full[: full.find(stop)]
    assert "".join(job.texts) == out.result
    assert out.metadata["finish_reason"] == "stop"


def test_sampling_params_follow_vllm_conventions(model: VLLMModel) -> None:
    greedy = model.sampling_params(Job().ctx)
    assert (greedy.temperature, greedy.top_k, greedy.top_p, greedy.max_tokens) == (0.0, -1, 1.0, 128)
    sampled = model.sampling_params(Job(temperature=0.7, top_k=0, top_p=0.9, max_tokens=5, seed=3, stop=["x"]).ctx)
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.max_tokens) == (0.7, -1, 0.9, 5)
    assert sampled.seed == 3 and sampled.stop == ["x"]
    assert model.sampling_params(Job(top_k=40).ctx).top_k == 40


@pytest.mark.parametrize("abort_style", ["final_output", "close"])
async def test_abort_stops_one_request_and_not_its_neighbour(tiny_model_dir: Path, abort_style: str) -> None:
    model = await fake_runtime(abort_style=abort_style).load(RECORD, tiny_model_dir, VLLMConfig(max_num_seqs=4))
    a, b = Job(max_tokens=200), Job("another prompt entirely", max_tokens=200)
    task_a = asyncio.create_task(model.run(a.ctx))
    task_b = asyncio.create_task(model.run(b.ctx))
    await assert_eventually(lambda: len(a.texts) >= 3 and len(b.texts) >= 3, message="both streaming")
    assert engine(model).max_running == 2
    await model.abort(a.ctx)
    out_a = await asyncio.wait_for(task_a, timeout=5)
    assert not task_b.done(), "aborting one request ended its neighbour"
    out_b = await asyncio.wait_for(task_b, timeout=10)

    assert engine(model).aborted == [a.request_id]
    assert a.ctx.cancelled.is_set() and not b.ctx.cancelled.is_set()
    assert out_a.metadata["finish_reason"] == "cancelled"
    assert out_a.metadata["completion_tokens"] < 200
    assert "".join(a.texts) == out_a.result
    assert out_b.metadata["finish_reason"] == "length"
    assert out_b.metadata["completion_tokens"] == 200
    assert out_b.result == expected_text("another prompt entirely", 200)
    await model.unload()


async def test_cancelled_context_aborts_the_engine_request(model: VLLMModel) -> None:
    job = Job(max_tokens=500)
    task = asyncio.create_task(model.run(job.ctx))
    await assert_eventually(lambda: len(job.texts) >= 2)
    job.ctx.cancel()  # what the worker does on a timeout
    out = await asyncio.wait_for(task, timeout=5)
    assert out.metadata["finish_reason"] == "cancelled"
    assert engine(model).aborted == [job.request_id]


async def test_cancelled_task_aborts_the_engine_request(model: VLLMModel) -> None:
    job = Job(max_tokens=500)
    task = asyncio.create_task(model.run(job.ctx))
    await assert_eventually(lambda: len(job.texts) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine(model).aborted == [job.request_id]
    assert engine(model).requests == {}


async def test_missing_prompt_is_a_validation_error(model: VLLMModel) -> None:
    with pytest.raises(ValidationFailed, match="prompt"):
        await model.run(Job(None).ctx)


async def test_unload_shuts_the_engine_down(tiny_model_dir: Path) -> None:
    loaded = await fake_runtime().load(RECORD, tiny_model_dir, VLLMConfig())
    fake = engine(loaded)
    await loaded.unload()
    assert fake.is_shut_down and loaded.engine is None


async def test_engine_start_failure_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        await fake_runtime().load(RECORD, tmp_path, VLLMConfig())


@pytest.mark.skipif(VLLMRuntime.available(), reason="vLLM and CUDA are present")
async def test_real_runtime_refuses_to_load_without_vllm_and_cuda(tiny_model_dir: Path) -> None:
    assert not VLLMRuntime.available()
    with pytest.raises(ModelLoadError, match="CUDA"):
        await VLLMRuntime().load(RECORD, tiny_model_dir, VLLMConfig())


@pytest.mark.gpu
@pytest.mark.skipif(not VLLMRuntime.available(), reason="needs vLLM and a CUDA GPU")
async def test_real_vllm_streams_and_aborts_on_the_tiny_model(tiny_model_dir: Path) -> None:
    loaded = await VLLMRuntime().load(
        RECORD,
        tiny_model_dir,
        VLLMConfig(gpu_memory_utilization=0.25, max_model_len=512, enforce_eager=True, max_num_seqs=4),
    )
    try:
        job = Job(max_tokens=16, temperature=0)
        out = await loaded.run(job.ctx)
        assert "".join(job.texts) == out.result
        assert 0 < out.metadata["completion_tokens"] <= 16
        assert out.metadata["finish_reason"] in {"length", "stop"}
        again = await loaded.run(Job(max_tokens=16, temperature=0).ctx)
        assert again.result == out.result

        long_a, long_b = Job(max_tokens=400, temperature=0), Job("Hello world", max_tokens=60, temperature=0)
        task_a = asyncio.create_task(loaded.run(long_a.ctx))
        task_b = asyncio.create_task(loaded.run(long_b.ctx))
        await assert_eventually(lambda: len(long_a.texts) >= 2, timeout=60)
        await loaded.abort(long_a.ctx)
        out_a = await asyncio.wait_for(task_a, timeout=30)
        out_b = await asyncio.wait_for(task_b, timeout=60)
        assert out_a.metadata["finish_reason"] == "cancelled"
        assert out_b.metadata["finish_reason"] in {"length", "stop"}
    finally:
        await loaded.unload()
