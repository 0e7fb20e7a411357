"""The ``pytorch`` runtime: TorchScript modules, fed tensors built from the job's ``args``.

Each element of ``input.args`` becomes one positional input tensor (``kwargs`` become
keyword tensors) of ``PyTorchConfig.dtype`` on the model's device. The forward pass runs
in a thread under ``torch.no_grad()``; tensor outputs (alone, or in a tuple, list or dict)
come back as nested lists. An input the module rejects (wrong shape, ragged lists) is a
:class:`~mnemos.errors.ValidationFailed` carrying torch's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from mnemos.errors import ExecutionError, JobCancelled, ModelLoadError, ValidationFailed
from mnemos.messages import JobOutput, ModelRecord
from mnemos.runtime_config import PyTorchConfig
from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime

__all__ = ["PyTorchRuntime", "TorchScriptModel"]

logger = logging.getLogger("mnemos.runtime.pytorch")


def _to_jsonable(value: Any) -> Any:
    """Tensors -> nested lists, recursively through tuples, lists and dicts."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExecutionError(f"the module returned a {type(value).__name__}, which has no JSON form")


class TorchScriptModel(LoadedModel):
    """A TorchScript module in memory. Forward passes are re-entrant, so a few may overlap."""

    max_concurrency = 4

    def __init__(self, record: ModelRecord, module: Any, config: PyTorchConfig, device: str) -> None:
        import torch

        self.record = record
        self.module = module
        self.config = config
        self.device = device
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        self.memory_bytes = int(
            sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(b.numel() * b.element_size() for b in module.buffers())
        )

    async def run(self, ctx: ExecutionContext) -> JobOutput:
        """Run one forward pass on tensors made from ``input.args``/``input.kwargs``."""
        inp = ctx.spec.input
        if not inp.args and not inp.kwargs:
            raise ValidationFailed("the pytorch runtime needs input.args (one entry per input tensor)")
        if ctx.cancel_flag.is_set():
            raise JobCancelled(f"job {ctx.job_id} was cancelled before it started")
        started = time.perf_counter()
        result = await asyncio.to_thread(self._forward, list(inp.args), dict(inp.kwargs))
        return JobOutput(
            result=result,
            metadata={"model": self.record.name, "device": self.device},
            metrics={"inference_ms": (time.perf_counter() - started) * 1000.0},
        )

    def _forward(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        import torch

        try:
            tensors = [torch.as_tensor(a, dtype=self.dtype, device=self.device) for a in args]
            named = {k: torch.as_tensor(v, dtype=self.dtype, device=self.device) for k, v in kwargs.items()}
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValidationFailed(f"input is not a tensor of {self.config.dtype}: {e}") from e
        amp = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if self.config.use_amp and self.device.startswith("cuda")
            else contextlib.nullcontext()
        )
        try:
            with torch.no_grad(), amp:
                output = self.module(*tensors, **named)
        except torch.cuda.OutOfMemoryError as e:
            raise ExecutionError(f"out of GPU memory: {e}", retryable=True) from e
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # TorchScript raises torch.jit.Error (a RuntimeError) for shape and type errors.
            raise ValidationFailed(f"the module rejected the input: {e}") from e
        return _to_jsonable(output)

    async def unload(self) -> None:
        """Drop the module and return cached GPU memory."""
        self.module = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        logger.info("unloaded %s", self.record.name)


class PyTorchRuntime(Runtime):
    """Loads ``PyTorchConfig.artifact`` (``model.pt``) with ``torch.jit.load``."""

    name: ClassVar[str] = "pytorch"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("torch") is not None

    async def load(self, model: ModelRecord, model_dir: Path, config: Any) -> TorchScriptModel:
        """Load the TorchScript file in a thread, onto the configured device and dtype."""
        if not isinstance(config, PyTorchConfig):
            raise ModelLoadError(f"expected PyTorchConfig, got {type(config).__name__}", retryable=False)
        loaded = await asyncio.to_thread(self._load_sync, model, Path(model_dir), config)
        logger.info("loaded %s on %s (%d bytes)", model.name, loaded.device, loaded.memory_bytes)
        return loaded

    def _load_sync(self, record: ModelRecord, model_dir: Path, config: PyTorchConfig) -> TorchScriptModel:
        import torch

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available", retryable=False)
        path = (model_dir / config.artifact).resolve()
        if not path.is_relative_to(model_dir.resolve()):
            raise ModelLoadError(f"artifact {config.artifact!r} is outside the model directory", retryable=False)
        if not path.is_file():
            raise ModelLoadError(f"artifact {config.artifact!r} not found in {model_dir}", retryable=False)
        try:
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
            module = module.to(getattr(torch, config.dtype))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"cannot load TorchScript {path.name}: {e}", retryable=False) from e
        module.eval()
        if config.compile:
            logger.info("%s: compile is ignored for TorchScript modules (already compiled)", record.name)
        return TorchScriptModel(record, module, config, device)
