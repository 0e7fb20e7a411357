"""The ``vllm`` runtime: vLLM's ``AsyncLLMEngine`` with continuous batching and per-request abort.

One engine per loaded model serves up to ``max_num_seqs`` jobs at once; each job is one
engine request with id ``<job_id>-<attempt>``. Cancelling a job aborts that request
only (``engine.abort(request_id)``); every other request in the batch keeps running.

vLLM is imported lazily, so this module imports (and its tests run) without it. The
engine and sampling parameters come from factories that default to vLLM's own
``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`` and ``SamplingParams``; tests
pass ``tests/fakes/fake_vllm.py`` instead.

The interface used, stable from vLLM 0.6 to the V1 engine: ``engine.generate(prompt,
sampling_params, request_id)`` is an async generator of ``RequestOutput`` whose
``outputs[0].text``/``token_ids`` are cumulative, ``outputs[0].finish_reason`` is set on
the last one (``stop``, ``length`` or ``abort``) and ``prompt_token_ids`` is the prompt;
``await engine.abort(request_id)``; ``engine.shutdown()`` where it exists (V1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from mnemos.errors import ExecutionError, MnemosError, ModelLoadError, ValidationFailed
from mnemos.messages import JobOutput, ModelRecord
from mnemos.runtime_config import VLLMConfig
from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime, text_prompt
from neuron_runtime.runtimes.transformers import DEFAULT_MAX_TOKENS, StopStringFilter, text_output

__all__ = ["VLLMRuntime", "VLLMModel", "EngineFactory", "SamplingParamsFactory", "engine_kwargs"]

logger = logging.getLogger("mnemos.runtime.vllm")

#: Builds an engine from ``AsyncEngineArgs`` keyword arguments.
EngineFactory = Callable[[dict[str, Any]], Any]
#: Builds a ``SamplingParams`` from keyword arguments.
SamplingParamsFactory = Callable[..., Any]

#: How long a request may take to wind down after ``abort`` before its stream is dropped.
ABORT_GRACE_SECONDS = 2.0


def _vllm_engine(kwargs: dict[str, Any]) -> Any:
    """The real engine: ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))``."""
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))


def _vllm_sampling_params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def engine_kwargs(model_dir: Path, config: VLLMConfig) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for a local model directory (no hub access)."""
    return {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "trust_remote_code": config.trust_remote_code,
        "quantization": config.quantization,
        "enforce_eager": config.enforce_eager,
    }


def _request_id(ctx: ExecutionContext) -> str:
    return f"{ctx.job_id}-{ctx.attempt}"


class VLLMModel(LoadedModel):
    """A running vLLM engine; serves ``max_num_seqs`` jobs at once."""

    merge_stream = True

    def __init__(
        self,
        record: ModelRecord,
        engine: Any,
        config: VLLMConfig,
        sampling_params: SamplingParamsFactory,
        memory_bytes: int,
        real: bool,
    ) -> None:
        self.record = record
        self.engine = engine
        self.config = config
        self.max_concurrency = config.max_num_seqs
        self.memory_bytes = memory_bytes
        self._sampling_params = sampling_params
        self._real = real
        self._active: set[str] = set()

    def sampling_params(self, ctx: ExecutionContext) -> Any:
        """The job's ``GenerationParams`` as vLLM ``SamplingParams`` (unset temperature = greedy)."""
        p = ctx.spec.input.parameters
        return self._sampling_params(
            max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=p.temperature if p.temperature is not None else 0.0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            top_k=p.top_k if p.top_k else -1,
            stop=list(p.stop) if p.stop else None,
            seed=p.seed,
        )

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Submit the prompt as one engine request and stream its text deltas."""
        if self.engine is None:
            raise ExecutionError(f"{self.record.name} is unloaded", retryable=True)
        tokenizer = await self.engine.get_tokenizer() if ctx.spec.input.messages else None
        prompt = text_prompt(ctx.spec.input, tokenizer, "vllm")
        try:
            params = self.sampling_params(ctx)
        except (ValueError, TypeError) as e:
            raise ValidationFailed(f"invalid sampling parameters: {e}") from e
        request_id = _request_id(ctx)
        stream = StopStringFilter(ctx.spec.input.parameters.stop)
        state: dict[str, Any] = {"last": None, "first_at": None}
        started = time.perf_counter()

        async def consume() -> None:
            async for out in self.engine.generate(prompt, params, request_id):
                state["last"] = out
                completion = out.outputs[0]
                if state["first_at"] is None and len(completion.token_ids):
                    state["first_at"] = time.perf_counter()
                delta = stream.feed(completion.text, final=bool(out.finished))
                if delta:
                    ctx.emit(delta)

        self._active.add(request_id)
        consumer = asyncio.ensure_future(consume())
        waiter = asyncio.ensure_future(ctx.cancelled.wait())
        aborted = False
        try:
            await asyncio.wait({consumer, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                aborted = True
                await self._abort_request(request_id)
                # A stopped request ends its stream (V1 with a final "abort" output, older
                # releases by closing it); drop the stream if it lingers.
                await asyncio.wait({consumer}, timeout=ABORT_GRACE_SECONDS)
                await _cancel_quietly(consumer)
            else:
                consumer.result()
        except asyncio.CancelledError:
            await self._abort_request(request_id)
            await _cancel_quietly(consumer)
            raise
        except MnemosError:
            raise
        except (ValueError, TypeError) as e:
            raise ValidationFailed(f"vLLM rejected the request: {e}") from e
        except Exception as e:
            raise ExecutionError(f"vLLM request failed: {type(e).__name__}: {e}", retryable=True) from e
        finally:
            waiter.cancel()
            self._active.discard(request_id)
        elapsed = time.perf_counter() - started

        last = state["last"]
        completion = last.outputs[0] if last is not None else None
        completion_tokens = len(completion.token_ids) if completion is not None else 0
        prompt_ids = getattr(last, "prompt_token_ids", None) if last is not None else None
        prompt_tokens = len(prompt_ids) if prompt_ids is not None else 0
        reason = completion.finish_reason if completion is not None else None
        if aborted or reason == "abort" or (reason is None and ctx.cancel_flag.is_set()):
            finish_reason = "cancelled"
        else:
            finish_reason = "stop" if stream.stopped else str(reason or "length")
        if not aborted and completion is not None and not stream.stopped:
            # Flush whatever the engine's final text adds beyond what was streamed.
            tail = stream.feed(completion.text, final=True)
            if tail:
                ctx.emit(tail)
        metrics = {
            "generation_ms": elapsed * 1000.0,
            "tokens_per_second": completion_tokens / elapsed if elapsed > 0 else 0.0,
        }
        if state["first_at"] is not None:
            metrics["time_to_first_token_ms"] = (state["first_at"] - started) * 1000.0
        return text_output(stream.text, prompt_tokens, completion_tokens, finish_reason, self.record.name, metrics,
                           request_id=request_id)

    async def abort(self, ctx: ExecutionContext) -> None:
        """Cancel ``ctx``'s job: abort its engine request only, then flag the context."""
        await self._abort_request(_request_id(ctx))
        ctx.cancel()

    async def _abort_request(self, request_id: str) -> None:
        """Abort one in-flight request, once (a second call is a no-op)."""
        if self.engine is None or request_id not in self._active:
            return
        self._active.discard(request_id)
        logger.info("%s: aborting request %s", self.record.name, request_id)
        await self.engine.abort(request_id)

    async def unload(self) -> None:
        """Shut the engine down and give its GPU memory back."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            if inspect.iscoroutinefunction(shutdown):
                await shutdown()
            else:
                await asyncio.to_thread(shutdown)
        del engine
        gc.collect()
        if self._real:
            await asyncio.to_thread(_free_cuda_memory)
        logger.info("unloaded %s", self.record.name)


async def _cancel_quietly(task: asyncio.Future[Any]) -> None:
    """Cancel a stream consumer and wait for it; its error no longer matters (logged)."""
    if task.done():
        if not task.cancelled() and task.exception() is not None:
            logger.debug("aborted stream ended with %r", task.exception())
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:
            logger.debug("aborted stream raised while closing", exc_info=True)
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


def _free_cuda_memory() -> None:
    """Tear down vLLM's distributed state (where the release has it) and empty the CUDA cache."""
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        cleanup_dist_env_and_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gpu_memory_bytes(config: VLLMConfig, model_dir: Path) -> int:
    """vLLM reserves ``gpu_memory_utilization`` of each GPU it uses; without CUDA, the weights' size."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            return int(total * config.gpu_memory_utilization)
    return sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())


class VLLMRuntime(Runtime):
    """Loads models into vLLM engines (or into the engine ``engine_factory`` builds)."""

    name: ClassVar[str] = "vllm"

    def __init__(
        self,
        engine_factory: EngineFactory | None = None,
        sampling_params_factory: SamplingParamsFactory | None = None,
    ) -> None:
        self._real = engine_factory is None
        self._engine_factory: EngineFactory = engine_factory or _vllm_engine
        self._sampling_params: SamplingParamsFactory = sampling_params_factory or _vllm_sampling_params

    @classmethod
    def available(cls) -> bool:
        """vLLM is installed and a CUDA GPU is visible."""
        if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
            return False
        import torch

        return bool(torch.cuda.is_available())

    async def load(self, model: ModelRecord, model_dir: Path, config: Any) -> VLLMModel:
        """Start an engine for ``model_dir`` in a thread (vLLM's start blocks for a while)."""
        if not isinstance(config, VLLMConfig):
            raise ModelLoadError(f"expected VLLMConfig, got {type(config).__name__}", retryable=False)
        if self._real and not self.available():
            raise ModelLoadError("the vllm runtime needs vLLM and a CUDA GPU", retryable=False)
        model_dir = Path(model_dir)
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._engine_factory, engine_kwargs(model_dir, config))
        except (ImportError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelLoadError(f"cannot start vLLM for {model.name}: {type(e).__name__}: {e}") from e
        memory = await asyncio.to_thread(_gpu_memory_bytes, config, model_dir)
        logger.info(
            "loaded %s (max_num_seqs=%d) in %.0f ms",
            model.name,
            config.max_num_seqs,
            (time.perf_counter() - started) * 1000.0,
        )
        return VLLMModel(model, engine, config, self._sampling_params, memory, self._real)
