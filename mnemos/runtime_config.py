"""Per-runtime configuration (the NEURON seed's VLLMConfig / TransformersConfig / PyTorchConfig).

What code a job runs and how its model is loaded are fixed by the model's registered
record, never by the job: a job's ``model.runtime_config`` may set only the fields its
runtime's config lists in ``JOB_FIELDS`` (today one: ``function``, which picks among the
functions a ``python`` model declares). :func:`job_runtime_config` is that rule, applied
by the control plane at submit and again by the worker before it loads anything, so a
dispatch message that did not come through the control plane gets no further.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from mnemos.errors import OverrideRefused, UnknownFunction, UnknownRuntime, ValidationFailed

__all__ = [
    "VLLMConfig",
    "TransformersConfig",
    "PyTorchConfig",
    "PythonConfig",
    "RuntimeConfig",
    "RUNTIME_CONFIGS",
    "parse_runtime_config",
    "job_runtime_config",
]

_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: A function, or a method of a class (``Generator.generate``).
_TARGET = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"


class _Config(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    #: Fields a job may set in its ``model.runtime_config``; every other field is the model's.
    JOB_FIELDS: ClassVar[frozenset[str]] = frozenset()


class VLLMConfig(_Config, frozen=True):
    tensor_parallel_size: Literal[1, 2, 4, 8] = 1
    pipeline_parallel_size: Literal[1, 2, 4, 8] = 1
    max_model_len: Annotated[int, Meta(gt=0)] | None = None
    gpu_memory_utilization: Annotated[float, Meta(gt=0, le=1.0)] = 0.9
    dtype: Literal["float16", "float32", "bfloat16", "auto"] = "auto"
    max_num_seqs: Annotated[int, Meta(ge=1)] = 256
    max_num_batched_tokens: Annotated[int, Meta(gt=0)] | None = None
    trust_remote_code: bool = False
    quantization: Literal["awq", "gptq", "squeezellm", "fp8"] | None = None
    enforce_eager: bool = False


class TransformersConfig(_Config, frozen=True):
    """``device`` and ``torch_dtype`` default to ``auto`` (seed: cuda/float16) so CPU works."""

    device: Literal["cuda", "cpu", "auto"] = "auto"
    torch_dtype: Literal["float16", "float32", "bfloat16", "auto"] = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    device_map: str | None = None
    trust_remote_code: bool = False
    use_flash_attention_2: bool = False
    low_cpu_mem_usage: bool = True
    #: Sequences one loaded model decodes together (continuous batching: concurrent jobs
    #: share each forward pass, joining and leaving between steps). 1 runs one generation
    #: at a time; more raises throughput on a busy model at some latency per token.
    max_batch_size: Annotated[int, Meta(ge=1, le=256)] = 8

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("cannot use both 8-bit and 4-bit quantization")


class PyTorchConfig(_Config, frozen=True):
    device: Annotated[str, Meta(pattern=r"^(auto|cuda|cpu|cuda:[0-9]+)$")] = "auto"
    dtype: Literal["float16", "float32", "bfloat16"] = "float32"
    batch_size: Annotated[int, Meta(ge=1, le=128)] = 1
    num_workers: Annotated[int, Meta(ge=0, le=16)] = 0
    compile: bool = False
    use_amp: bool = False
    #: File inside the model directory holding the TorchScript module.
    artifact: str = "model.pt"


class PythonConfig(_Config, frozen=True):
    """How a ``python`` model's code is found and run.

    ``isolation="thread"`` (a pushed directory of functions): ``entrypoint`` is
    ``module:function`` (importable) or ``file.py:function`` (in the model dir), imported
    into the worker; ``functions`` declares the module's other functions jobs may call by
    name (``function``); the entrypoint's own function is always callable.

    ``isolation="process"`` (a deployed :class:`mnemos.App`): ``entrypoint`` is
    ``file.py:<App variable>``, run in a child process of the worker per app version;
    ``functions`` lists the app's callables (``add``, ``Generator.generate``), one of which
    every job names; ``requirements`` are pip requirements the worker installs into a cached
    environment of the app's own. Everything but ``function`` is set when the model is
    registered; a job can only pick one of the declared functions.
    """

    JOB_FIELDS: ClassVar[frozenset[str]] = frozenset({"function"})

    entrypoint: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_./-]+:[A-Za-z_][A-Za-z0-9_]*$")]
    #: Names a job may call besides the entrypoint's function (process isolation: the only ones).
    functions: Annotated[list[Annotated[str, Meta(pattern=_TARGET)]], Meta(max_length=256)] = []
    #: The function this job calls (one of :attr:`callable_names`); None: the entrypoint's.
    function: Annotated[str, Meta(pattern=_TARGET)] | None = None
    #: Run a plain (sync) function in a thread so it cannot block the worker.
    threaded: bool = True
    #: ``thread``: imported into the worker; ``process``: a child process per app version.
    isolation: Literal["thread", "process"] = "thread"
    #: pip requirements of a process-isolated app (installed once per worker and set).
    requirements: Annotated[list[Annotated[str, Meta(min_length=1, max_length=512)]], Meta(max_length=64)] = []

    def __post_init__(self) -> None:
        if self.isolation == "thread" and any("." in f for f in self.functions):
            raise ValueError("a dotted function (Class.method) needs isolation 'process'")
        if self.requirements and self.isolation != "process":
            raise ValueError("requirements need isolation 'process' (an app)")
        if self.function is not None and self.function not in self.callable_names:
            raise UnknownFunction(
                f"function {self.function!r} is not declared by the model; it declares: "
                f"{', '.join(sorted(self.callable_names))}",
                details={"function": self.function, "declared": sorted(self.callable_names)},
            )

    @property
    def callable_names(self) -> frozenset[str]:
        """Every function a job may call: the declared ``functions``, and for a thread model
        its entrypoint's function."""
        if self.isolation == "process":
            return frozenset(self.functions)
        return frozenset({self.entrypoint.rpartition(":")[2], *self.functions})

    @property
    def target(self) -> str:
        """``module:function`` actually called (``function`` picks a declared one)."""
        module, _, name = self.entrypoint.rpartition(":")
        if self.isolation == "process":
            return f"{module}:{self.function or (self.functions[0] if self.functions else '')}"
        return f"{module}:{self.function or name}"


RuntimeConfig = VLLMConfig | TransformersConfig | PyTorchConfig | PythonConfig

RUNTIME_CONFIGS: dict[str, type[Any]] = {
    "vllm": VLLMConfig,
    "transformers": TransformersConfig,
    "pytorch": PyTorchConfig,
    "python": PythonConfig,
}


def parse_runtime_config(runtime: str, *layers: dict[str, Any]) -> Any:
    """Merge ``layers`` (later wins) and decode strictly into ``runtime``'s config type."""
    cls = RUNTIME_CONFIGS.get(runtime)
    if cls is None:
        raise UnknownRuntime(f"unknown runtime {runtime!r}; known: {sorted(RUNTIME_CONFIGS)}")
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    try:
        return msgspec.convert(merged, type=cls)
    except UnknownFunction:
        raise
    except (msgspec.ValidationError, ValueError) as e:
        raise ValidationFailed(f"invalid runtime_config for {runtime}: {e}") from e


def job_runtime_config(runtime: str, registered: dict[str, Any], job: dict[str, Any]) -> Any:
    """The config a job runs with: the model's ``registered`` config with the job's own
    ``runtime_config`` laid over it, where the job may set only its runtime's
    ``JOB_FIELDS``. Anything else (an ``entrypoint``, a device, ``trust_remote_code``...)
    raises :class:`~mnemos.errors.OverrideRefused`; a ``function`` the model does not
    declare raises :class:`~mnemos.errors.UnknownFunction`."""
    cls = RUNTIME_CONFIGS.get(runtime)
    if cls is None:
        raise UnknownRuntime(f"unknown runtime {runtime!r}; known: {sorted(RUNTIME_CONFIGS)}")
    refused = sorted(set(job) - cls.JOB_FIELDS)
    if refused:
        allowed = ", ".join(sorted(cls.JOB_FIELDS)) or "nothing"
        raise OverrideRefused(
            f"a job may not set {', '.join(refused)} in model.runtime_config: what code runs and how the "
            f"model loads are fixed by its registration (a {runtime} job may set: {allowed})",
            details={"refused": refused, "allowed": sorted(cls.JOB_FIELDS)},
        )
    return parse_runtime_config(runtime, registered, job)
