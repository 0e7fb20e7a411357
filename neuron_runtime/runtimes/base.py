"""The interface every runtime implements, and the context a job runs in.

A :class:`Runtime` turns a model directory (already downloaded and sha256-verified by the
disk cache) into a :class:`LoadedModel`; the worker keeps loaded models in an LRU and calls
:meth:`LoadedModel.run` once per job with an :class:`ExecutionContext`.

Contract for ``run``:
- stream output with ``ctx.emit(text)`` as it is produced (never blocks: the worker
  publishes asynchronously, in order);
- stop promptly when ``ctx.cancelled`` is set (it is set on cancel and on timeout) - for
  work in a thread, poll ``ctx.cancel_flag.is_set()`` (a :class:`CancelFlag`);
- return a :class:`~mnemos.messages.JobOutput` (``metadata`` carries token counts and
  ``finish_reason`` for text runtimes);
- raise a :class:`mnemos.errors.MnemosError` subclass for a known failure; anything else
  is recorded as ``execution_error``.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mnemos.errors import ValidationFailed
from mnemos.messages import JobInput, JobOutput, JobSpec, ModelRecord

__all__ = ["CancelFlag", "ExecutionContext", "LoadedModel", "Runtime", "text_prompt"]


class CancelFlag:
    """A flag a thread can poll (``is_set``) and the event loop sets once: what runtimes
    need of a ``threading.Event`` (nobody blocks on it), without its lock and condition,
    which would be built for every job. Reading and writing one attribute is atomic."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass
class ExecutionContext:
    """What a runtime sees of one job attempt."""

    job_id: str
    attempt: int
    spec: JobSpec
    #: Called with (text, data) for every streamed chunk; set by the worker.
    sink: Callable[[str, Any], None] = field(default=lambda text, data: None)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_flag: CancelFlag = field(default_factory=CancelFlag)
    started: float = field(default_factory=time.perf_counter)
    first_chunk_at: float | None = None
    chunks: int = 0
    #: Milliseconds the runtime spent loading during the run (an app process started
    #: again, a class entered): counted as the job's load time.
    load_ms: float | None = None

    def emit(self, text: str, data: Any = None) -> None:
        """Stream one chunk of output. Safe to call from the event loop thread only."""
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        self.chunks += 1
        self.sink(text, data)

    def cancel(self) -> None:
        """Ask the runtime to stop this execution (cancel or timeout)."""
        self.cancel_flag.set()
        self.cancelled.set()

    @property
    def first_token_ms(self) -> float | None:
        if self.first_chunk_at is None:
            return None
        return (self.first_chunk_at - self.started) * 1000.0


class LoadedModel(abc.ABC):
    """A model in memory, ready to run jobs."""

    #: Bytes of (GPU or host) memory the model holds, for the memory LRU.
    memory_bytes: int = 0
    #: How many jobs may run on this model at once (vLLM batches; a CPU model runs one).
    max_concurrency: int = 1
    #: Stopping an execution may cancel its asyncio task right after :meth:`abort` (plain
    #: coroutines); otherwise the run gets a grace period to wind down on ``ctx.cancelled``.
    stop_by_cancelling_task: bool = False
    #: Streamed text pieces are tokens and may be merged in transport (see the worker's
    #: ``stream_interval_ms``); items of a Python generator are not.
    merge_stream: bool = False

    @abc.abstractmethod
    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Run one job; see the module docstring for the contract."""

    async def abort(self, ctx: ExecutionContext) -> None:
        """Stop ``ctx``'s execution inside the engine (vLLM: ``abort(request_id)``)."""
        ctx.cancel()

    async def unload(self) -> None:
        """Free the model's memory. Called once, when evicted or at shutdown."""


class Runtime(abc.ABC):
    """Loads models of one kind (``name`` is the job's ``model.runtime``)."""

    name: ClassVar[str]

    @classmethod
    def available(cls) -> bool:
        """Whether this runtime can run here (its libraries import, its device exists)."""
        return True

    @abc.abstractmethod
    async def load(self, model: ModelRecord, model_dir: Path, config: Any) -> LoadedModel:
        """Load ``model`` from ``model_dir`` with the parsed runtime ``config``."""

    def attach(self, services: Any) -> None:
        """Given the worker's disk cache and catalog once it has them (see
        :class:`neuron_runtime.app_host.AppServices`); most runtimes need neither."""

    async def close(self) -> None:
        """Release what the runtime holds beyond its loaded models (worker shutdown)."""


def text_prompt(job_input: JobInput, tokenizer: Any, runtime: str) -> str:
    """The prompt text of a text job: ``prompt`` as given, or ``messages`` rendered with the
    tokenizer's chat template. A tokenizer without one (a base model) gets a plain
    ``Role: content`` transcript ending with ``Assistant:``."""
    if job_input.prompt:
        return job_input.prompt
    if not job_input.messages:
        raise ValidationFailed(f"the {runtime} runtime needs input.prompt or input.messages")
    turns = [{"role": m.role, "content": m.content} for m in job_input.messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        except Exception as e:  # a template that rejects these turns (e.g. no system role)
            raise ValidationFailed(f"the model's chat template rejected the messages: {e}") from e
    lines = [f"{m.role.capitalize()}: {m.content}" for m in job_input.messages]
    return "\n".join([*lines, "Assistant:"])
