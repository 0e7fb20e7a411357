"""The transformers, python and pytorch runtimes against real artifacts built at test time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mnemos.errors import ExecutionError, JobCancelled, ModelLoadError, ValidationFailed
from mnemos.messages import ArtifactLocation, GenerationParams, JobInput, JobSpec, ModelRecord, ModelRef
from mnemos.runtime_config import PythonConfig, PyTorchConfig, TransformersConfig
from neuron_runtime.runtimes import (
    RUNTIME_CLASSES,
    ExecutionContext,
    PythonRuntime,
    PyTorchRuntime,
    TransformersModel,
    TransformersRuntime,
    available_runtimes,
)
from neuron_runtime.runtimes.transformers import StopStringFilter
from registry.demo import (
    DEMO_FUNCTIONS_FAMILY,
    DEMO_FUNCTIONS_VERSION,
    DEMO_MODEL_FAMILY,
    DEMO_MODEL_VERSION,
    build_demo_torchscript,
)
from tests.conftest import assert_eventually

PROMPT = "The worker pulls a job from the queue"


def record(family: str, version: str, runtime: str) -> ModelRecord:
    return ModelRecord(
        family=family,
        version=version,
        runtime=runtime,  # type: ignore[arg-type]
        artifact=ArtifactLocation(store="nats", bucket="x", prefix="p"),
        files=[],
        total_size=0,
        created_at=datetime.now(UTC),
    )


class Job:
    """An execution context for one job plus the chunks it streamed."""

    _n = 0

    def __init__(self, family: str, version: str, **input_fields: Any) -> None:
        Job._n += 1
        self.chunks: list[tuple[str, Any]] = []
        self.ctx = ExecutionContext(
            job_id=f"job{Job._n}",
            attempt=1,
            spec=JobSpec(model=ModelRef(family=family, version=version), input=JobInput(**input_fields)),
            sink=lambda text, data: self.chunks.append((text, data)),
        )

    @property
    def texts(self) -> list[str]:
        return [text for text, _ in self.chunks]


def lm_job(prompt: str | None = PROMPT, **params: Any) -> Job:
    return Job(DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, prompt=prompt, parameters=GenerationParams(**params))


def fn_job(*args: Any, **kwargs: Any) -> Job:
    return Job(DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION, args=list(args), kwargs=kwargs)


# ----------------------------------------------------------------------------- registry


def test_runtime_table_and_availability() -> None:
    assert sorted(RUNTIME_CLASSES) == ["python", "pytorch", "transformers", "vllm"]
    assert {"python", "pytorch", "transformers"} <= set(available_runtimes())


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="session")
async def tiny_lm(tiny_model_dir: Path) -> AsyncIterator[TransformersModel]:
    runtime = TransformersRuntime()
    loaded = await runtime.load(
        record(DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, "transformers"), tiny_model_dir, TransformersConfig()
    )
    yield loaded
    await loaded.unload()


async def test_transformers_load_reports_memory_and_device(tiny_lm: TransformersModel) -> None:
    assert tiny_lm.device == "cpu"
    assert tiny_lm.max_concurrency == 8  # TransformersConfig.max_batch_size: continuous batching
    params = sum(p.numel() for p in tiny_lm.model.parameters())
    assert tiny_lm.memory_bytes >= params * 4  # float32 on CPU


async def test_tokens_stream_one_by_one_and_join_to_the_result(tiny_lm: TransformersModel) -> None:
    job = lm_job(max_tokens=24, temperature=0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        out = await tiny_lm.run(job.ctx)
    finally:
        tick_task.cancel()
    meta = out.metadata
    # The demo model writes printable ASCII: every token is one non-empty chunk.
    assert meta["completion_tokens"] == 24 == len(job.chunks)
    assert all(text for text in job.texts)
    assert "".join(job.texts) == out.result
    assert meta["finish_reason"] == "length"
    assert meta["prompt_tokens"] == len(tiny_lm.tokenizer(PROMPT)["input_ids"])
    assert meta["total_tokens"] == meta["prompt_tokens"] + 24
    assert meta["model"] == f"{DEMO_MODEL_FAMILY}:{DEMO_MODEL_VERSION}"
    assert out.metrics["tokens_per_second"] > 0 and out.metrics["generation_ms"] > 0
    assert ticks > 0, "the event loop was blocked during generation"


async def test_max_tokens_bounds_completion_tokens(tiny_lm: TransformersModel) -> None:
    for max_tokens in (1, 5):
        job = lm_job(max_tokens=max_tokens, temperature=0.8, seed=3)
        out = await tiny_lm.run(job.ctx)
        assert out.metadata["completion_tokens"] <= max_tokens
        assert "".join(job.texts) == out.result


async def test_greedy_is_deterministic(tiny_lm: TransformersModel) -> None:
    first = await tiny_lm.run(lm_job(max_tokens=30, temperature=0).ctx)
    second = await tiny_lm.run(lm_job(max_tokens=30).ctx)  # unset temperature = greedy
    assert first.result == second.result and first.result


async def test_seeded_sampling_is_reproducible(tiny_lm: TransformersModel) -> None:
    a = await tiny_lm.run(lm_job(max_tokens=30, temperature=1.0, seed=7).ctx)
    b = await tiny_lm.run(lm_job(max_tokens=30, temperature=1.0, seed=7).ctx)
    assert a.result == b.result
    others = [
        (await tiny_lm.run(lm_job(max_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=s).ctx)).result
        for s in (1, 2)
    ]
    assert any(o != a.result for o in others)


async def test_stop_string_cuts_stream_and_result(tiny_lm: TransformersModel) -> None:
    full = (await tiny_lm.run(lm_job(max_tokens=40, temperature=0).ctx)).result
    stop = full[12:16]
    expected = full[: full.find(stop)]
    job = lm_job(max_tokens=40, temperature=0, stop=[stop, "never-in-output-zz"])
    out = await tiny_lm.run(job.ctx)
    assert out.result == expected
    assert "".join(job.texts) == expected
    assert stop not in "".join(job.texts)
    assert out.metadata["finish_reason"] == "stop"
    assert out.metadata["completion_tokens"] < 40


async def test_cancel_mid_generation_stops_within_a_token(tiny_lm: TransformersModel) -> None:
    job = lm_job(max_tokens=900, temperature=0)
    task = asyncio.create_task(tiny_lm.run(job.ctx))
    await assert_eventually(lambda: len(job.chunks) >= 3, message="no tokens streamed")
    await tiny_lm.abort(job.ctx)
    out = await asyncio.wait_for(task, timeout=5)
    assert out.metadata["finish_reason"] == "cancelled"
    assert out.metadata["completion_tokens"] < 900
    assert "".join(job.texts) == out.result


async def test_cancelled_task_frees_the_model_for_the_next_job(tiny_lm: TransformersModel) -> None:
    job = lm_job(max_tokens=900, temperature=0)
    task = asyncio.create_task(tiny_lm.run(job.ctx))
    await assert_eventually(lambda: len(job.chunks) >= 1, message="no tokens streamed")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.ctx.cancel_flag.is_set()
    out = await asyncio.wait_for(tiny_lm.run(lm_job(max_tokens=3, temperature=0).ctx), timeout=10)
    assert out.metadata["completion_tokens"] == 3


async def test_with_max_batch_size_1_generations_run_one_at_a_time(tiny_model_dir: Path) -> None:
    solo = await TransformersRuntime().load(record(DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, "transformers"),
                                            tiny_model_dir, TransformersConfig(max_batch_size=1))
    try:
        assert solo.max_concurrency == 1
        a, b = lm_job(max_tokens=20, temperature=0), lm_job("Hello world", max_tokens=20, temperature=0)
        order: list[str] = []
        a.ctx.sink = lambda text, data: order.append("a")
        b.ctx.sink = lambda text, data: order.append("b")
        out_a, out_b = await asyncio.gather(solo.run(a.ctx), solo.run(b.ctx))
        assert order == ["a"] * 20 + ["b"] * 20
        alone = await solo.run(lm_job("Hello world", max_tokens=20, temperature=0).ctx)
        assert out_b.result == alone.result
    finally:
        await solo.unload()


async def test_missing_prompt_is_a_validation_error(tiny_lm: TransformersModel) -> None:
    with pytest.raises(ValidationFailed, match="prompt"):
        await tiny_lm.run(lm_job(None).ctx)


async def test_chat_messages_use_the_chat_template_or_a_plain_transcript(tiny_lm: TransformersModel) -> None:
    from mnemos.messages import ChatMessage
    from neuron_runtime.runtimes.base import text_prompt

    chat = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    job_input = JobInput(messages=chat)
    tok = tiny_lm.tokenizer
    assert not getattr(tok, "chat_template", None)  # a base model: a plain transcript
    assert text_prompt(job_input, tok, "transformers") == "System: Be brief.\nUser: Hi\nAssistant:"
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        assert text_prompt(job_input, tok, "transformers") == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
        out = await tiny_lm.run(Job(DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, messages=chat,
                                    parameters=GenerationParams(max_tokens=5, temperature=0)).ctx)
        plain = await tiny_lm.run(lm_job("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", max_tokens=5,
                                         temperature=0).ctx)
        assert out.result == plain.result and out.metadata["prompt_tokens"] == plain.metadata["prompt_tokens"]
    finally:
        tok.chat_template = None


async def test_missing_model_dir_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        await TransformersRuntime().load(record("nope", "v1", "transformers"), tmp_path, TransformersConfig())


def test_stop_filter_holds_back_possible_stop_prefixes() -> None:
    f = StopStringFilter(["END"])
    assert f.feed("abc E") == "abc "
    assert f.feed("abc EN") == ""
    assert f.feed("abc ENx") == "ENx"
    assert f.feed("abc ENx caf\ufffd") == " caf"
    assert f.feed("abc ENx café END more") == "é "
    assert f.stopped and f.text == "abc ENx café "


# ----------------------------------------------------------------------------- python


async def load_fn(model_dir: Path, entrypoint: str, threaded: bool = True) -> Any:
    return await PythonRuntime().load(
        record(DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION, "python"),
        model_dir,
        PythonConfig(entrypoint=entrypoint, threaded=threaded),
    )


@pytest.fixture
def user_functions(tmp_path: Path) -> Path:
    (tmp_path / "user.py").write_text(
        "import asyncio, threading\n"
        "state = {'started': False, 'cancelled': False}\n"
        "def not_json():\n    return object()\n"
        "def bad_items():\n    yield 1\n    yield object()\n"
        "async def wait_forever():\n"
        "    state['started'] = True\n"
        "    try:\n        await asyncio.sleep(3600)\n"
        "    except asyncio.CancelledError:\n        state['cancelled'] = True\n        raise\n"
        "def thread_name():\n    return threading.current_thread().name\n"
    )
    return tmp_path


async def test_python_sync_function_runs_in_a_thread(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:echo")
    assert fn.max_concurrency == 1000
    out = await fn.run(fn_job(1, "a", k=2).ctx)
    assert out.result == {"args": [1, "a"], "kwargs": {"k": 2}}
    assert out.metadata["function"] == "functions.py:echo"


async def test_python_inline_and_none_results(demo_functions_dir: Path) -> None:
    add = await load_fn(demo_functions_dir, "functions.py:add", threaded=False)
    assert (await add.run(fn_job(2, 3.5).ctx)).result == 5.5
    noop = await load_fn(demo_functions_dir, "functions.py:noop")
    assert (await noop.run(fn_job().ctx)).result is None


async def test_python_threaded_flag_picks_the_thread(user_functions: Path) -> None:
    threaded = await load_fn(user_functions, "user.py:thread_name", threaded=True)
    inline = await load_fn(user_functions, "user.py:thread_name", threaded=False)
    import threading

    assert (await inline.run(fn_job().ctx)).result == threading.current_thread().name
    assert (await threaded.run(fn_job().ctx)).result != threading.current_thread().name


async def test_python_async_functions_run_concurrently(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:sleep")
    started = time.perf_counter()
    outs = await asyncio.gather(*(fn.run(fn_job(0.3).ctx) for _ in range(20)))
    assert [o.result for o in outs] == [0.3] * 20
    assert time.perf_counter() - started < 3.0  # 20 x 0.3 s one after another would be 6 s


async def test_python_async_generator_streams_text(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:stream_words")
    job = fn_job("one two three four")
    out = await fn.run(job.ctx)
    assert job.texts == ["one ", "two ", "three ", "four"]
    assert out.result == job.texts
    assert "".join(job.texts) == "one two three four"


async def test_python_sync_generator_streams_data(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:count")
    job = fn_job(5)
    out = await fn.run(job.ctx)
    assert job.chunks == [("", i) for i in range(5)]
    assert out.result == [0, 1, 2, 3, 4]


async def test_python_exception_becomes_execution_error(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:fail")
    with pytest.raises(ExecutionError) as err:
        await fn.run(fn_job(message="kaput").ctx)
    assert err.value.message == "RuntimeError: kaput"
    assert err.value.details is not None and "in fail" in err.value.details["traceback"]


async def test_python_non_json_results_are_rejected(user_functions: Path) -> None:
    fn = await load_fn(user_functions, "user.py:not_json")
    with pytest.raises(ExecutionError, match="not JSON-encodable"):
        await fn.run(fn_job().ctx)
    gen = await load_fn(user_functions, "user.py:bad_items")
    job = fn_job()
    with pytest.raises(ExecutionError, match="not JSON-encodable"):
        await gen.run(job.ctx)
    assert job.chunks == [("", 1)]


async def test_python_bad_arguments_are_a_validation_error(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:add")
    with pytest.raises(ValidationFailed, match="arguments do not match"):
        await fn.run(fn_job(1).ctx)


async def test_python_module_entrypoint(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "json:dumps")
    assert (await fn.run(fn_job([1, 2]).ctx)).result == "[1, 2]"


@pytest.mark.parametrize(
    "entrypoint", ["functions.py:missing", "nothere.py:echo", "../outside.py:echo", "no_such_module_zz:f"]
)
async def test_python_bad_entrypoints_fail_to_load(demo_functions_dir: Path, entrypoint: str) -> None:
    with pytest.raises(ModelLoadError):
        await load_fn(demo_functions_dir, entrypoint)


async def test_python_coroutine_stops_the_way_the_executor_stops_it(user_functions: Path) -> None:
    # Coroutines run in the executor's task and declare that a stop cancels that task.
    fn = await load_fn(user_functions, "user.py:wait_forever")
    assert fn.stop_by_cancelling_task is True
    job = fn_job()
    task = asyncio.create_task(fn.run(job.ctx))
    await assert_eventually(lambda: fn.fn.__globals__["state"]["started"])
    await fn.abort(job.ctx)
    assert job.ctx.cancelled.is_set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=2)
    assert fn.fn.__globals__["state"]["cancelled"] is True


async def test_python_task_cancellation_reaches_user_code(user_functions: Path) -> None:
    fn = await load_fn(user_functions, "user.py:wait_forever")
    task = asyncio.create_task(fn.run(fn_job().ctx))
    await assert_eventually(lambda: fn.fn.__globals__["state"]["started"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fn.fn.__globals__["state"]["cancelled"] is True


async def test_python_cancel_stops_a_stream(demo_functions_dir: Path) -> None:
    fn = await load_fn(demo_functions_dir, "functions.py:stream_words")
    job = fn_job(" ".join(["word"] * 200), delay=0.01)
    task = asyncio.create_task(fn.run(job.ctx))
    await assert_eventually(lambda: len(job.chunks) >= 2)
    job.ctx.cancel()
    with pytest.raises(JobCancelled):
        await asyncio.wait_for(task, timeout=2)
    assert len(job.chunks) < 200


async def test_python_modules_of_two_loads_are_separate(demo_functions_dir: Path) -> None:
    a = await load_fn(demo_functions_dir, "functions.py:echo")
    b = await load_fn(demo_functions_dir, "functions.py:echo")
    assert a.module_name != b.module_name
    await a.unload()
    assert (await b.run(fn_job(1).ctx)).result == {"args": [1], "kwargs": {}}


# ----------------------------------------------------------------------------- pytorch


@pytest.fixture(scope="session")
def torchscript_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_torchscript(tmp_path_factory.mktemp("torchscript"))


async def test_pytorch_output_equals_the_modules_own(torchscript_dir: Path) -> None:
    import torch

    loaded = await PyTorchRuntime().load(record("demo-linear", "v1", "pytorch"), torchscript_dir, PyTorchConfig())
    batch = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
    out = await loaded.run(Job("demo-linear", "v1", args=[batch]).ctx)
    expected = torch.jit.load(str(torchscript_dir / "model.pt"))(torch.tensor(batch)).tolist()  # type: ignore[no-untyped-call]
    assert out.result == expected
    assert loaded.memory_bytes == (4 * 2 + 2) * 4
    await loaded.unload()


async def test_pytorch_bad_input_is_a_validation_error(torchscript_dir: Path) -> None:
    loaded = await PyTorchRuntime().load(record("demo-linear", "v1", "pytorch"), torchscript_dir, PyTorchConfig())
    with pytest.raises(ValidationFailed, match="shapes"):
        await loaded.run(Job("demo-linear", "v1", args=[[[1.0, 2.0, 3.0]]]).ctx)
    with pytest.raises(ValidationFailed):
        await loaded.run(Job("demo-linear", "v1", args=[[[1.0], [1.0, 2.0]]]).ctx)
    with pytest.raises(ValidationFailed, match="input.args"):
        await loaded.run(Job("demo-linear", "v1").ctx)


async def test_pytorch_missing_artifact_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        await PyTorchRuntime().load(record("demo-linear", "v1", "pytorch"), tmp_path, PyTorchConfig())


def test_incremental_detokenizer_matches_a_full_decode(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from neuron_runtime.runtimes.transformers import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("naïve café — streaming, token by token: ünïcödé ✓ and plain words too")
    inc = IncrementalDetokenizer(tok)
    for i, t in enumerate(ids):
        text = inc.add([t], final=i == len(ids) - 1)
        assert "\ufffd" not in text
        assert tok.decode(ids[: i + 1], skip_special_tokens=True).startswith(text)
    assert text == tok.decode(ids, skip_special_tokens=True)
