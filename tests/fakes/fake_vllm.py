"""A stand-in for vLLM's ``AsyncLLMEngine`` where vLLM cannot run (no CUDA here).

It honours the part of vLLM's interface the ``vllm`` runtime uses:
``FakeAsyncLLMEngine.from_engine_args(args)``; ``generate(prompt, sampling_params,
request_id)`` - an async generator of ``RequestOutput``-like objects whose
``outputs[0].text`` and ``outputs[0].token_ids`` are cumulative, ``finish_reason`` is
``None`` until the last one (``"stop"``, ``"length"`` or ``"abort"``), ``finished`` marks
the last one, ``prompt_token_ids`` is the prompt; ``await abort(request_id)`` ends that
request only; ``shutdown()``.

Text is deterministic: one word per token from a fixed list, walked by a generator
seeded from the prompt (and ``seed`` when sampling), one token per engine step with an
``await asyncio.sleep(step_seconds)`` between steps so concurrent requests interleave
like continuous batching and an abort lands mid-stream. Like vLLM 0.6 (V0), streamed
text may show the start of a stop string that the final output then cuts off; the
runtime must hold such a tail back.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "WORDS",
    "FakeAsyncEngineArgs",
    "FakeSamplingParams",
    "FakeCompletionOutput",
    "FakeRequestOutput",
    "FakeAsyncLLMEngine",
]

WORDS = (
    "the quick brown fox jumps over a lazy dog while engines stream tokens to every "
    "client and workers pull jobs from queues in order"
).split()


@dataclass
class FakeAsyncEngineArgs:
    """The ``AsyncEngineArgs`` fields the runtime sets."""

    model: str
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    trust_remote_code: bool = False
    quantization: str | None = None
    enforce_eager: bool = False


@dataclass
class FakeSamplingParams:
    """vLLM's ``SamplingParams`` fields the runtime sets, validated as vLLM 0.6 does."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}")


@dataclass
class FakeCompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    cumulative_logprob: float | None = None


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]
    finished: bool


@dataclass
class _Request:
    request_id: str
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeAsyncLLMEngine:
    """Deterministic word generator with vLLM's async engine interface.

    ``abort_style`` picks how an aborted stream ends: ``"final_output"`` (V1: one last
    output with ``finish_reason="abort"``) or ``"close"`` (older releases: it just ends).
    """

    def __init__(
        self,
        args: FakeAsyncEngineArgs,
        *,
        step_seconds: float = 0.002,
        abort_style: Literal["final_output", "close"] = "final_output",
    ) -> None:
        if not (Path(args.model) / "config.json").is_file():
            raise OSError(f"no config.json in {args.model}")
        self.args = args
        self.step_seconds = step_seconds
        self.abort_style = abort_style
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.max_running = 0
        self.is_shut_down = False

    @classmethod
    def from_engine_args(cls, engine_args: FakeAsyncEngineArgs, **options: Any) -> FakeAsyncLLMEngine:
        return cls(engine_args, **options)

    async def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, as ``AsyncLLMEngine.get_tokenizer()`` returns it."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.args.tokenizer or self.args.model)

    @staticmethod
    def expected_words(prompt: str, params: FakeSamplingParams) -> list[str]:
        """The words a request produces before stops and limits (for assertions)."""
        seed = zlib.crc32(prompt.encode())
        if params.temperature > 0 and params.seed is not None:
            seed ^= params.seed
        rng = random.Random(seed)
        return [rng.choice(WORDS) for _ in range(params.max_tokens)]

    async def generate(
        self, prompt: str, sampling_params: FakeSamplingParams, request_id: str
    ) -> AsyncIterator[FakeRequestOutput]:
        if self.is_shut_down:
            raise RuntimeError("engine is shut down")
        if request_id in self.requests:
            raise ValueError(f"request {request_id} already exists")
        if not isinstance(sampling_params, FakeSamplingParams):
            raise TypeError(f"sampling_params must be FakeSamplingParams, got {type(sampling_params).__name__}")
        request = self.requests[request_id] = _Request(request_id)
        self.max_running = max(self.max_running, len(self.requests))
        prompt_ids = [zlib.crc32(w.encode()) % 50000 for w in prompt.split()]
        words = self.expected_words(prompt, sampling_params)
        token_ids: list[int] = []
        text = ""
        try:
            for word in words:
                await asyncio.sleep(self.step_seconds)
                if request.aborted.is_set():
                    if self.abort_style == "final_output":
                        yield self._output(request_id, prompt, prompt_ids, text, token_ids, "abort")
                    return
                token_ids.append(WORDS.index(word))
                text += " " + word
                cut = self._first_stop(text, sampling_params.stop)
                if cut is not None:
                    yield self._output(request_id, prompt, prompt_ids, text[:cut], token_ids, "stop")
                    self.finished.append(request_id)
                    return
                done = len(token_ids) == sampling_params.max_tokens
                yield self._output(request_id, prompt, prompt_ids, text, token_ids, "length" if done else None)
            self.finished.append(request_id)
        finally:
            self.requests.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Abort one request; unknown or finished ids are ignored, as in vLLM."""
        request = self.requests.get(request_id)
        if request is not None and not request.aborted.is_set():
            request.aborted.set()
            self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.is_shut_down = True

    @staticmethod
    def _first_stop(text: str, stops: list[str] | None) -> int | None:
        found = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
        return min(found) if found else None

    @staticmethod
    def _output(
        request_id: str, prompt: str, prompt_ids: list[int], text: str, token_ids: list[int], reason: str | None
    ) -> FakeRequestOutput:
        return FakeRequestOutput(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_ids),
            outputs=[FakeCompletionOutput(index=0, text=text, token_ids=list(token_ids), finish_reason=reason)],
            finished=reason is not None,
        )
