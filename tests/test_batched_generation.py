"""Continuous batching in the transformers runtime, on the tiny demo model built at test time.

Concurrent generations on one loaded model share forward passes; each must still produce
what it would alone (greedy token for token, seeded sampling draw for draw), stream every
token, honour its own stop strings, budget and cancellation, and a failure must reach the
requests it affects instead of hanging them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mnemos.errors import ExecutionError, ValidationFailed
from mnemos.messages import ArtifactLocation, GenerationParams, JobInput, JobOutput, JobSpec, ModelRecord, ModelRef
from mnemos.runtime_config import TransformersConfig, parse_runtime_config
from neuron_runtime.runtimes import ExecutionContext, TransformersModel, TransformersRuntime
from registry.demo import DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION
from tests.conftest import assert_eventually

#: Different lengths (2 to 20-odd tokens), so the batched cache is left-padded.
PROMPTS = [
    "Hi",
    "The worker pulls a job from the queue",
    "Call me Ishmael.",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "Numbers like 0 1 2 3",
    "To be, or not to be, that is the question: whether it is nobler in the mind to suffer",
    "The rain in Spain",
    "Hello world! How are you today?",
]


class Job:
    """One job's execution context and the chunks it streamed, in a shared ``order`` log."""

    def __init__(self, prompt: str, order: list[int] | None = None, tag: int = 0, **params: Any) -> None:
        self.chunks: list[str] = []

        def sink(text: str, data: Any) -> None:
            self.chunks.append(text)
            if order is not None:
                order.append(tag)

        self.ctx = ExecutionContext(
            job_id=f"batch-{tag}",
            attempt=1,
            spec=JobSpec(
                model=ModelRef(family=DEMO_MODEL_FAMILY, version=DEMO_MODEL_VERSION),
                input=JobInput(prompt=prompt, parameters=GenerationParams(**params)),
            ),
            sink=sink,
        )

    @property
    def streamed(self) -> str:
        return "".join(self.chunks)


async def load(model_dir: Path, max_batch_size: int) -> TransformersModel:
    record = ModelRecord(
        family=DEMO_MODEL_FAMILY,
        version=DEMO_MODEL_VERSION,
        runtime="transformers",
        artifact=ArtifactLocation(store="nats", bucket="x", prefix="p"),
        files=[],
        total_size=0,
        created_at=datetime.now(UTC),
    )
    loaded = await TransformersRuntime().load(record, model_dir, TransformersConfig(max_batch_size=max_batch_size))
    assert isinstance(loaded, TransformersModel)
    return loaded


@pytest.fixture(scope="module")
async def batched_lm(tiny_model_dir: Path) -> AsyncIterator[TransformersModel]:
    loaded = await load(tiny_model_dir, 8)
    yield loaded
    await loaded.unload()


@pytest.fixture
async def fresh_lm(tiny_model_dir: Path) -> AsyncIterator[TransformersModel]:
    """A model of its own, for tests that break its forward pass or its loop."""
    loaded = await load(tiny_model_dir, 4)
    yield loaded
    await loaded.unload()


async def alone(lm: TransformersModel, prompt: str, **params: Any) -> JobOutput:
    """The output of one generation with nothing else running on the model."""
    return await lm.run(Job(prompt, **params).ctx)


def switches(order: list[int]) -> int:
    """How often consecutive chunks came from different jobs."""
    return sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)


# ----------------------------------------------------------------------------- equivalence


async def test_concurrent_greedy_equals_one_at_a_time_token_for_token(batched_lm: TransformersModel) -> None:
    assert batched_lm.max_concurrency == 8
    singles = [await alone(batched_lm, p, max_tokens=40, temperature=0) for p in PROMPTS]

    order: list[int] = []
    jobs = [Job(p, order, i, max_tokens=40, temperature=0) for i, p in enumerate(PROMPTS)]
    outs = await asyncio.wait_for(asyncio.gather(*(batched_lm.run(j.ctx) for j in jobs)), timeout=60)

    for single, out, job in zip(singles, outs, jobs, strict=True):
        assert out.result == single.result and out.result
        assert out.metadata == single.metadata
        assert job.streamed == out.result
        assert len(job.chunks) == out.metadata["completion_tokens"] == 40
    # The streams were interleaved step by step: they shared forward passes.
    assert switches(order) > 4 * len(PROMPTS)


async def test_greedy_matches_transformers_generate(batched_lm: TransformersModel) -> None:
    import torch

    prompt = PROMPTS[3]
    encoded = batched_lm.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = batched_lm.model.generate(**encoded, max_new_tokens=30, do_sample=False)
    expected = batched_lm.tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    outs = await asyncio.gather(*(batched_lm.run(Job(p, max_tokens=30, temperature=0).ctx) for p in PROMPTS))
    assert outs[3].result == expected


async def test_a_request_joins_a_running_batch_at_the_next_step(batched_lm: TransformersModel) -> None:
    long = Job(PROMPTS[1], tag=1, max_tokens=900, temperature=0)
    long_task = asyncio.create_task(batched_lm.run(long.ctx))
    await assert_eventually(lambda: len(long.chunks) >= 3, message="the long generation streamed nothing")

    late = Job(PROMPTS[6], tag=2, max_tokens=6, temperature=0)
    out = await asyncio.wait_for(batched_lm.run(late.ctx), timeout=30)
    assert not long_task.done(), "the late request waited for the running generation to end"
    assert len(long.chunks) < 900

    await batched_lm.abort(long.ctx)
    long_out = await asyncio.wait_for(long_task, timeout=10)
    assert long_out.metadata["finish_reason"] == "cancelled"
    assert out.result == (await alone(batched_lm, PROMPTS[6], max_tokens=6, temperature=0)).result
    # The long generation, cut where it was, is the prefix of its unbatched text.
    full = await alone(batched_lm, PROMPTS[1], max_tokens=long_out.metadata["completion_tokens"], temperature=0)
    assert full.result == long_out.result


async def test_each_request_keeps_its_own_sampling_budget_and_stop_strings(batched_lm: TransformersModel) -> None:
    greedy_full = (await alone(batched_lm, PROMPTS[2], max_tokens=40, temperature=0)).result
    stop = greedy_full[12:16]
    params: list[dict[str, Any]] = [
        {"max_tokens": 40, "temperature": 0},
        {"max_tokens": 40, "temperature": 0, "stop": [stop, "never-in-output-zz"]},
        {"max_tokens": 30, "temperature": 1.0, "seed": 7},
        {"max_tokens": 30, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 11},
        {"max_tokens": 3, "temperature": 0},
    ]
    prompts = [PROMPTS[2], PROMPTS[2], PROMPTS[0], PROMPTS[4], PROMPTS[7]]
    singles = [await alone(batched_lm, p, **kw) for p, kw in zip(prompts, params, strict=True)]

    jobs = [Job(p, tag=i, **kw) for i, (p, kw) in enumerate(zip(prompts, params, strict=True))]
    outs = await asyncio.gather(*(batched_lm.run(j.ctx) for j in jobs))

    for single, out, job in zip(singles, outs, jobs, strict=True):
        assert out.result == single.result
        assert out.metadata["completion_tokens"] == single.metadata["completion_tokens"]
        assert out.metadata["finish_reason"] == single.metadata["finish_reason"]
        assert job.streamed == out.result
    assert outs[1].result == greedy_full[: greedy_full.find(stop)]
    assert stop not in jobs[1].streamed and outs[1].metadata["finish_reason"] == "stop"
    assert outs[4].metadata["completion_tokens"] == 3 and outs[4].metadata["finish_reason"] == "length"
    assert outs[2].result != (await alone(batched_lm, PROMPTS[0], max_tokens=30, temperature=1.0, seed=8)).result


async def test_cancelling_one_request_leaves_the_others_intact(batched_lm: TransformersModel) -> None:
    jobs = [Job(p, tag=i, max_tokens=60 if i != 1 else 900, temperature=0) for i, p in enumerate(PROMPTS[:3])]
    tasks = [asyncio.create_task(batched_lm.run(j.ctx)) for j in jobs]
    await assert_eventually(lambda: len(jobs[1].chunks) >= 2, message="nothing streamed")
    await batched_lm.abort(jobs[1].ctx)
    outs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    assert outs[1].metadata["finish_reason"] == "cancelled"
    assert outs[1].metadata["completion_tokens"] < 900
    assert jobs[1].streamed == outs[1].result
    for i in (0, 2):
        assert outs[i].result == (await alone(batched_lm, PROMPTS[i], max_tokens=60, temperature=0)).result


async def test_the_batch_never_exceeds_max_batch_size(tiny_model_dir: Path) -> None:
    lm = await load(tiny_model_dir, 2)
    try:
        assert lm.max_concurrency == 2
        order: list[int] = []
        jobs = [Job(p, order, i, max_tokens=10 * (i + 1), temperature=0) for i, p in enumerate(PROMPTS[:4])]
        outs = await asyncio.gather(*(lm.run(j.ctx) for j in jobs))
    finally:
        await lm.unload()
    assert [o.metadata["completion_tokens"] for o in outs] == [10, 20, 30, 40]
    # Jobs 0 and 1 decode first; job 2 takes job 0's place, job 3 job 1's.
    assert order.index(2) > len(order) - 1 - order[::-1].index(0)
    assert order.index(3) > len(order) - 1 - order[::-1].index(1)
    assert switches(order) > 10


async def test_a_prompt_too_long_fails_alone(batched_lm: TransformersModel) -> None:
    too_long = " ".join(["fox"] * 1100)
    results = await asyncio.gather(
        batched_lm.run(Job(PROMPTS[1], max_tokens=10, temperature=0).ctx),
        batched_lm.run(Job(too_long, max_tokens=10, temperature=0).ctx),
        return_exceptions=True,
    )
    assert isinstance(results[0], JobOutput) and results[0].metadata["completion_tokens"] == 10
    assert isinstance(results[1], ValidationFailed) and "context" in str(results[1])


def test_max_batch_size_is_validated() -> None:
    assert parse_runtime_config("transformers", {}).max_batch_size == 8
    assert parse_runtime_config("transformers", {"max_batch_size": 16}).max_batch_size == 16
    for bad in (0, -1, 10_000):
        with pytest.raises(ValidationFailed, match="max_batch_size"):
            parse_runtime_config("transformers", {"max_batch_size": bad})


# ----------------------------------------------------------------------------- failures


async def test_a_failed_step_fails_its_batch_and_the_loop_goes_on(
    fresh_lm: TransformersModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fresh_lm.model.forward
    failures = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        """The model's own forward pass, except that the first step with 3 rows raises."""
        nonlocal failures
        if kwargs["input_ids"].shape[0] == 3 and failures == 0:
            failures += 1
            raise RuntimeError("injected failure in a batched forward pass")
        return real(*args, **kwargs)

    monkeypatch.setattr(fresh_lm.model, "forward", forward)
    jobs = [Job(p, tag=i, max_tokens=50, temperature=0) for i, p in enumerate(PROMPTS[:3])]
    results = await asyncio.wait_for(
        asyncio.gather(*(fresh_lm.run(j.ctx) for j in jobs), return_exceptions=True), timeout=30
    )
    assert failures == 1
    assert all(isinstance(r, ExecutionError) and "injected failure" in str(r) for r in results), results

    out = await asyncio.wait_for(fresh_lm.run(Job(PROMPTS[0], max_tokens=5, temperature=0).ctx), timeout=30)
    assert out.metadata["completion_tokens"] == 5
    assert out.result == (await alone(fresh_lm, PROMPTS[0], max_tokens=5, temperature=0)).result


async def test_a_crashed_loop_fails_its_requests_and_the_next_request_restarts_it(
    fresh_lm: TransformersModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = fresh_lm._loop
    real_step = loop._step
    crashes = 0

    def step(batch: Any) -> None:
        """The loop's own step, except that the first one with 3 rows hits a bug."""
        nonlocal crashes
        if len(batch.rows) == 3 and crashes == 0:
            crashes += 1
            raise AssertionError("a bug in the loop")
        real_step(batch)

    monkeypatch.setattr(loop, "_step", step)
    jobs = [Job(p, tag=i, max_tokens=20, temperature=0) for i, p in enumerate(PROMPTS[:3])]
    results = await asyncio.wait_for(
        asyncio.gather(*(fresh_lm.run(j.ctx) for j in jobs), return_exceptions=True), timeout=30
    )
    assert crashes == 1
    assert all(isinstance(r, ExecutionError) and "crashed" in str(r) and "a bug in the loop" in str(r)
               for r in results), results
    assert all(r.retryable for r in results if isinstance(r, ExecutionError))

    out = await asyncio.wait_for(fresh_lm.run(Job(PROMPTS[0], max_tokens=5, temperature=0).ctx), timeout=30)
    assert out.metadata["completion_tokens"] == 5


async def test_unload_lets_running_generations_finish_then_refuses_new_ones(tiny_model_dir: Path) -> None:
    lm = await load(tiny_model_dir, 4)
    job = Job(PROMPTS[0], max_tokens=20, temperature=0)
    running = asyncio.create_task(lm.run(job.ctx))
    await assert_eventually(lambda: job.chunks, message="nothing streamed")
    await lm.unload()
    out = await asyncio.wait_for(running, timeout=10)
    assert out.metadata["completion_tokens"] == 20 and job.streamed == out.result
    with pytest.raises(ExecutionError, match="unloaded"):
        await lm.run(Job(PROMPTS[0], max_tokens=5, temperature=0).ctx)
