"""Per-runtime configuration (the NEURON seed's VLLMConfig / TransformersConfig / PyTorchConfig).

A job's ``model.runtime_config`` is laid over the model's registered defaults and decoded
strictly into the runtime's config type, on the control plane (to reject bad jobs at
submit) and again on the worker (to run them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from mnemos.errors import UnknownRuntime, ValidationFailed

__all__ = [
    "VLLMConfig",
    "TransformersConfig",
    "PyTorchConfig",
    "PythonConfig",
    "RuntimeConfig",
    "RUNTIME_CONFIGS",
    "parse_runtime_config",
]


class _Config(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


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
    """``entrypoint`` is ``module:function`` (importable) or ``file.py:function`` (in the model dir)."""

    entrypoint: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_./-]+:[A-Za-z_][A-Za-z0-9_]*$")]
    #: Run another function of the same module (a job's override of the entrypoint's name).
    function: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: Run a plain (sync) function in a thread so it cannot block the worker.
    threaded: bool = True

    @property
    def target(self) -> str:
        """``module:function`` actually called (``function`` overrides the entrypoint's)."""
        module, _, name = self.entrypoint.rpartition(":")
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
    except (msgspec.ValidationError, ValueError) as e:
        raise ValidationFailed(f"invalid runtime_config for {runtime}: {e}") from e
