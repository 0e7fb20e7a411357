"""The ``transformers`` runtime: Hugging Face causal LMs with real token-by-token streaming.

Every generation of a loaded model runs on that model's own thread (the event loop stays
free), in a continuous batch of up to ``max_batch_size`` sequences (see
:mod:`neuron_runtime.runtimes.batching`): requests join and leave between decoding steps
and share each step's forward pass. For every new token the request's :class:`_Generation`
decodes the generated text so far and hands the new piece to the event loop with
``loop.call_soon_threadsafe``. Stop strings are applied to the decoded text, holding back
any tail that could still become a stop string, so neither the stream nor the result ever
contains one. Cancellation is polled from ``ctx.cancel_flag`` before every step: a
generation ends within one token.

torch and transformers are imported when a model loads, not when this module does, so
the worker starts fast and runs where they are absent.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mnemos.errors import ModelLoadError
from mnemos.messages import JobOutput, ModelRecord
from mnemos.runtime_config import TransformersConfig

from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime, text_prompt
from neuron_runtime.runtimes.batching import GenerationLoop, Sampling, SequenceResult

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MAX_TOKENS", "TransformersRuntime", "TransformersModel", "StopStringFilter"]

logger = logging.getLogger("mnemos.runtime.transformers")

#: ``max_tokens`` when a job gives none (same default in the vLLM runtime).
DEFAULT_MAX_TOKENS = 128


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available", retryable=False)
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 on CPU (half precision is slow or unsupported there)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    resolved = getattr(torch, dtype)
    assert isinstance(resolved, torch.dtype)
    return resolved


# ----------------------------------------------------------------------------- stop strings


class StopStringFilter:
    """Turns the growing decoded text into safe-to-stream deltas, cutting at stop strings.

    ``feed(text, final)`` takes the whole text generated so far and returns the piece that
    may be streamed now. Until ``final`` it holds back a trailing U+FFFD (a multi-byte
    character still being completed) and the longest tail that is a prefix of a stop
    string. Once a stop string appears, the text is cut before it and ``stopped`` is set.
    The concatenation of every returned piece is :attr:`text`.
    """

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in (stops or ()) if s)
        self.text = ""
        self.stopped = False
        self.mismatches = 0

    def feed(self, text: str, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        cut = self._first_stop(text)
        if cut is not None:
            text = text[:cut]
            self.stopped = True
            final = True
        if not final:
            text = text[: len(text) - self._holdback(text)]
        if not text.startswith(self.text):
            # Decoding is prefix-stable for byte-level BPE; anything else keeps what was sent.
            self.mismatches += 1
            return ""
        delta = text[len(self.text) :]
        self.text = text
        return delta

    def _first_stop(self, text: str) -> int | None:
        if not self.stops:
            return None
        # Everything already streamed was checked: look only where a new match can start.
        start = max(0, len(self.text) - max(len(s) for s in self.stops))
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _holdback(self, text: str) -> int:
        keep = len(text) - len(text.rstrip("\ufffd"))
        tail = text[: len(text) - keep] if keep else text
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:n]):
                    longest = n
                    break
        return keep + longest


def text_output(
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    model: str,
    metrics: dict[str, float],
    **extra: Any,
) -> JobOutput:
    """The output of a text generation, with the token counts every text runtime reports."""
    return JobOutput(
        result=text,
        metadata={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "finish_reason": finish_reason,
            "model": model,
            **extra,
        },
        metrics=metrics,
    )


class IncrementalDetokenizer:
    """The text of a growing token sequence at linear total cost (vLLM's approach).

    Decoding all tokens after every new one is quadratic in the output length. This decodes
    only a window: the tokens since the last point where the text was stable. A piece whose
    decoding ends in U+FFFD (a multi-byte character not complete yet) waits for the next
    token, except at the end.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, ids: list[int], *, final: bool = False) -> str:
        """Append ``ids``; the whole text so far."""
        self.ids.extend(ids)
        if len(self.ids) == self._read:
            return self.text
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text


# ----------------------------------------------------------------------------- one generation


@dataclass
class _Generation:
    """One job's stream: the generating thread feeds it tokens (a
    :class:`~neuron_runtime.runtimes.batching.TokenSink`), the event loop emits the text."""

    ctx: ExecutionContext
    loop: asyncio.AbstractEventLoop
    filter: StopStringFilter
    tokenizer: Any
    detokenizer: IncrementalDetokenizer
    cancelled: bool = False
    emit_error: BaseException | None = None

    def should_stop(self) -> bool:
        """Polled by the generation loop before every step (generating thread)."""
        if self.ctx.cancel_flag.is_set():
            self.cancelled = True
            return True
        return self.filter.stopped or self.emit_error is not None

    def on_tokens(self, ids: list[int], *, final: bool = False) -> None:
        """New token ids from the generation loop (generating thread): decode and stream the delta."""
        if self.filter.stopped:
            return
        text = self.detokenizer.add(ids, final=final)
        delta = self.filter.feed(text, final=final)
        if delta:
            self.loop.call_soon_threadsafe(self._deliver, delta)

    def _deliver(self, text: str) -> None:
        """Runs on the event loop: stream one piece; keep the first sink error to re-raise."""
        if self.emit_error is not None:
            return
        try:
            self.ctx.emit(text)
        except Exception as e:  # noqa: BLE001 - re-raised by run() once generation stops
            self.emit_error = e


# ----------------------------------------------------------------------------- loaded model


class TransformersModel(LoadedModel):
    """A causal LM and its tokenizer in memory; its generations share a continuous batch.

    ``max_concurrency`` is the batch bound, so the worker runs as many of this model's
    jobs at once as can decode together.
    """

    merge_stream = True

    def __init__(self, record: ModelRecord, model: Any, tokenizer: Any, device: str, *,
                 max_batch_size: int = 1) -> None:
        self.record = record
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.memory_bytes = _memory_bytes(model)
        self.max_positions: int | None = _max_positions(model, tokenizer)
        self._loop = GenerationLoop(model, tokenizer, device, name=record.name, max_batch_size=max_batch_size,
                                    max_positions=self.max_positions)
        self.max_concurrency = self._loop.max_batch_size

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Generate from ``input.prompt`` (or ``messages``), streaming each new piece of text."""
        prompt = text_prompt(ctx.spec.input, self.tokenizer, "transformers")
        params = ctx.spec.input.parameters
        generation = _Generation(
            ctx=ctx,
            loop=asyncio.get_running_loop(),
            filter=StopStringFilter(params.stop),
            tokenizer=self.tokenizer,
            detokenizer=IncrementalDetokenizer(self.tokenizer),
        )
        sampling = Sampling(
            max_new_tokens=params.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
        )
        future = asyncio.wrap_future(self._loop.submit(prompt, sampling, generation, job_id=ctx.job_id))
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker gave up on the job: the loop drops it at its next step; wait for
            # that so the job's stream ends before the worker moves on.
            ctx.cancel_flag.set()
            await asyncio.wait([future])
            raise
        if generation.emit_error is not None:
            raise generation.emit_error
        return self._output(generation, result)

    def _output(self, generation: _Generation, result: SequenceResult) -> JobOutput:
        """The job's output: the streamed text, token counts, finish reason and timings."""
        ctx = generation.ctx
        completion_tokens = len(result.token_ids)
        elapsed = result.finished - result.started
        if generation.cancelled:
            finish_reason = "cancelled"
        elif generation.filter.stopped or result.ended_by == "eos":
            finish_reason = "stop"
        else:
            finish_reason = "length"
        if generation.filter.mismatches:
            logger.warning("job %s: %d decoded pieces were not prefix-stable", ctx.job_id, generation.filter.mismatches)
        metrics = {
            "generation_ms": elapsed * 1000.0,
            "tokens_per_second": completion_tokens / elapsed if elapsed > 0 else 0.0,
        }
        if result.first_token_at is not None:
            metrics["time_to_first_token_ms"] = (result.first_token_at - result.started) * 1000.0
        logger.debug(
            "job %s generated %d tokens in %.1f ms (%s)", ctx.job_id, completion_tokens, elapsed * 1e3, finish_reason
        )
        return text_output(generation.filter.text, result.prompt_tokens, completion_tokens, finish_reason,
                           self.record.name, metrics)

    async def unload(self) -> None:
        """Drop the weights and give GPU memory back (after any generation still winding down)."""
        await asyncio.to_thread(self._loop.close)
        self.model = None
        self.tokenizer = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        logger.info("unloaded %s", self.record.name)


def _memory_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(total)


def _max_positions(model: Any, tokenizer: Any) -> int | None:
    """The longest sequence the model accepts (its position table), if it declares one."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return None


# ----------------------------------------------------------------------------- runtime


class TransformersRuntime(Runtime):
    """Loads Hugging Face causal LMs from a local model directory (no hub access)."""

    name: ClassVar[str] = "transformers"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None

    async def load(self, model: ModelRecord, model_dir: Path, config: Any) -> TransformersModel:
        """Load tokenizer and weights in a thread (the event loop keeps heartbeating)."""
        if not isinstance(config, TransformersConfig):
            raise ModelLoadError(f"expected TransformersConfig, got {type(config).__name__}", retryable=False)
        started = time.perf_counter()
        loaded = await asyncio.to_thread(self._load_sync, model, Path(model_dir), config)
        logger.info(
            "loaded %s on %s (%.1f MiB) in %.0f ms",
            model.name,
            loaded.device,
            loaded.memory_bytes / 2**20,
            (time.perf_counter() - started) * 1000.0,
        )
        return loaded

    def _load_sync(self, record: ModelRecord, model_dir: Path, config: TransformersConfig) -> TransformersModel:
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ModelLoadError(f"transformers is not installed: {e}", retryable=False) from e

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.torch_dtype, device)
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
        # transformers 5 renamed torch_dtype to dtype and dropped low_cpu_mem_usage.
        if int(transformers.__version__.split(".")[0]) >= 5:
            kwargs["dtype"] = dtype
        else:
            kwargs["torch_dtype"] = dtype
            kwargs["low_cpu_mem_usage"] = config.low_cpu_mem_usage
        if config.use_flash_attention_2:
            kwargs["attn_implementation"] = "flash_attention_2"
        if config.load_in_8bit or config.load_in_4bit:
            if not device.startswith("cuda"):
                raise ModelLoadError("8-bit/4-bit quantization needs a CUDA device", retryable=False)
            bnb_config: Any = transformers.BitsAndBytesConfig
            kwargs["quantization_config"] = bnb_config(
                load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit
            )
        placed_by_transformers = bool(config.device_map) or "quantization_config" in kwargs
        if config.device_map:
            kwargs["device_map"] = config.device_map
        elif "quantization_config" in kwargs:
            kwargs["device_map"] = device

        auto_model: Any = AutoModelForCausalLM  # typed loosely: its stubs reject a path
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=config.trust_remote_code
            )
            model = auto_model.from_pretrained(str(model_dir), **kwargs)
            if not placed_by_transformers:
                model = model.to(device)
        except (OSError, ValueError, RuntimeError, ImportError, KeyError) as e:
            raise ModelLoadError(f"cannot load {record.name} from {model_dir}: {type(e).__name__}: {e}") from e
        model.eval()
        if placed_by_transformers:
            device = str(next(model.parameters()).device)
        return TransformersModel(record, model, tokenizer, device, max_batch_size=config.max_batch_size)
