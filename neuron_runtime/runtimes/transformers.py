"""The ``transformers`` runtime: Hugging Face causal LMs with real token-by-token streaming.

``model.generate`` runs in a thread of the loaded model's own single-thread executor (one
generation at a time per model; the event loop stays free). A streamer subclassing
transformers' ``BaseStreamer`` receives every new token, decodes the generated text so
far and hands the new piece to the event loop with ``loop.call_soon_threadsafe``. Stop
strings are applied to the decoded text, holding back any tail that could still become a
stop string, so neither the stream nor the result ever contains one. Cancellation is a
``StoppingCriteria`` polling ``ctx.cancel_flag``: generation ends within one token.

torch and transformers are imported when a model loads, not when this module does, so
the worker starts fast and runs where they are absent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mnemos.errors import ExecutionError, ModelLoadError, ValidationFailed
from mnemos.messages import JobOutput, ModelRecord
from mnemos.runtime_config import TransformersConfig

from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime, text_prompt

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MAX_TOKENS", "TransformersRuntime", "TransformersModel", "StopStringFilter"]

logger = logging.getLogger("mnemos.runtime.transformers")

#: ``max_tokens`` when a job gives none (same default in the vLLM runtime).
DEFAULT_MAX_TOKENS = 128

#: Seeding sets torch's process-wide generator: seeded generations take this lock so two
#: of them (on different models) cannot interleave their draws.
_SEED_LOCK = threading.Lock()


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
    """State shared between the generating thread and the event loop for one job."""

    ctx: ExecutionContext
    loop: asyncio.AbstractEventLoop
    filter: StopStringFilter
    tokenizer: Any
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    emit_error: BaseException | None = None
    first_token_at: float | None = None

    def should_stop(self) -> bool:
        """Polled by the stopping criteria after every token (generating thread)."""
        if self.ctx.cancel_flag.is_set():
            self.cancelled = True
            return True
        return self.filter.stopped or self.emit_error is not None

    def on_tokens(self, ids: list[int], *, final: bool = False) -> None:
        """New token ids from ``generate`` (generating thread): decode and stream the delta."""
        if ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.extend(ids)
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


def _streamer_class() -> type[Any]:
    """Build the ``BaseStreamer`` subclass (transformers is imported lazily)."""
    from transformers.generation.streamers import BaseStreamer

    class TokenStreamer(BaseStreamer):
        """Forwards each new token to the generation; the first ``put`` is the prompt."""

        def __init__(self, generation: _Generation) -> None:
            self.generation = generation
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.generation.on_tokens([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            self.generation.on_tokens([], final=True)

    return TokenStreamer


def _stopping_criteria(should_stop: Callable[[], bool]) -> Any:
    """A ``StoppingCriteriaList`` that ends generation when ``should_stop()`` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


# ----------------------------------------------------------------------------- loaded model


class TransformersModel(LoadedModel):
    """A causal LM and its tokenizer in memory; runs one generation at a time."""

    merge_stream = True

    max_concurrency = 1

    def __init__(self, record: ModelRecord, model: Any, tokenizer: Any, device: str) -> None:
        self.record = record
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.memory_bytes = _memory_bytes(model)
        self.max_positions: int | None = _max_positions(model, tokenizer)
        self._lock = asyncio.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"mnemos-generate-{record.family}"
        )
        self._streamer_cls = _streamer_class()

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Generate from ``input.prompt`` (or ``messages``), streaming each new piece of text."""
        prompt = text_prompt(ctx.spec.input, self.tokenizer, "transformers")
        async with self._lock:
            loop = asyncio.get_running_loop()
            generation = _Generation(
                ctx=ctx,
                loop=loop,
                filter=StopStringFilter(ctx.spec.input.parameters.stop),
                tokenizer=self.tokenizer,
                detokenizer=IncrementalDetokenizer(self.tokenizer),
            )
            future = loop.run_in_executor(self._executor, self._generate, generation, prompt)
            try:
                output = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The worker gave up on the job: stop the thread (within one token) and
                # keep the model busy until it has, so the next job starts clean.
                ctx.cancel_flag.set()
                await asyncio.wait([future])
                raise
        if generation.emit_error is not None:
            raise generation.emit_error
        return output

    def _generate(self, generation: _Generation, prompt: str) -> JobOutput:
        """Runs in the executor thread: tokenize, ``generate`` with streaming, build the output."""
        import torch

        ctx = generation.ctx
        params = ctx.spec.input.parameters
        encoded = self.tokenizer(prompt, return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        prompt_tokens = int(input_ids.shape[1])

        max_new = params.max_tokens or DEFAULT_MAX_TOKENS
        if self.max_positions is not None:
            room = self.max_positions - prompt_tokens
            if room <= 0:
                raise ValidationFailed(
                    f"prompt has {prompt_tokens} tokens; the model's context is {self.max_positions}"
                )
            max_new = min(max_new, room)

        sampling = bool(params.temperature)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "max_new_tokens": max_new,
            "do_sample": sampling,
            "streamer": self._streamer_cls(generation),
            "stopping_criteria": _stopping_criteria(generation.should_stop),
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        }
        if sampling:
            # Unset top_p/top_k mean "no filtering" (as in vLLM), not transformers' top_k=50.
            kwargs["temperature"] = params.temperature
            kwargs["top_p"] = params.top_p if params.top_p is not None else 1.0
            kwargs["top_k"] = params.top_k if params.top_k else 0
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)

        started = time.perf_counter()
        if ctx.cancel_flag.is_set():
            generation.cancelled = True
        else:
            try:
                with torch.inference_mode():
                    if sampling and params.seed is not None:
                        with _SEED_LOCK:
                            torch.manual_seed(params.seed)
                            self.model.generate(**kwargs)
                    else:
                        self.model.generate(**kwargs)
            except torch.cuda.OutOfMemoryError as e:
                raise ExecutionError(f"out of GPU memory while generating: {e}", retryable=True) from e
            except (RuntimeError, ValueError, IndexError) as e:
                raise ExecutionError(f"generation failed: {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - started

        completion_tokens = len(generation.token_ids)
        eos = self.tokenizer.eos_token_id
        if generation.cancelled:
            finish_reason = "cancelled"
        elif generation.filter.stopped or (generation.token_ids and generation.token_ids[-1] == eos):
            finish_reason = "stop"
        else:
            finish_reason = "length"
        if generation.filter.mismatches:
            logger.warning("job %s: %d decoded pieces were not prefix-stable", ctx.job_id, generation.filter.mismatches)
        metrics = {
            "generation_ms": elapsed * 1000.0,
            "tokens_per_second": completion_tokens / elapsed if elapsed > 0 else 0.0,
        }
        if generation.first_token_at is not None:
            metrics["time_to_first_token_ms"] = (generation.first_token_at - started) * 1000.0
        logger.debug(
            "job %s generated %d tokens in %.1f ms (%s)", ctx.job_id, completion_tokens, elapsed * 1e3, finish_reason
        )
        return text_output(generation.filter.text, prompt_tokens, completion_tokens, finish_reason,
                           self.record.name, metrics)

    async def unload(self) -> None:
        """Drop the weights and give GPU memory back (after any generation still winding down)."""
        await asyncio.to_thread(self._executor.shutdown, True)
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
        return TransformersModel(record, model, tokenizer, device)
