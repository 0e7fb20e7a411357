"""Runtimes: turn a model directory into something that runs jobs.

``RUNTIME_CLASSES`` maps a job's ``model.runtime`` to its :class:`Runtime` class;
:func:`available_runtimes` lists those that can run on this machine (the worker
advertises them). Importing this package imports neither torch, transformers nor vLLM.
"""

from __future__ import annotations

from neuron_runtime.runtimes.base import ExecutionContext, LoadedModel, Runtime
from neuron_runtime.runtimes.python import PythonFunction, PythonRuntime
from neuron_runtime.runtimes.pytorch import PyTorchRuntime, TorchScriptModel
from neuron_runtime.runtimes.transformers import TransformersModel, TransformersRuntime
from neuron_runtime.runtimes.vllm import VLLMModel, VLLMRuntime

__all__ = [
    "ExecutionContext",
    "LoadedModel",
    "Runtime",
    "PythonRuntime",
    "PythonFunction",
    "PyTorchRuntime",
    "TorchScriptModel",
    "TransformersRuntime",
    "TransformersModel",
    "VLLMRuntime",
    "VLLMModel",
    "RUNTIME_CLASSES",
    "available_runtimes",
]

RUNTIME_CLASSES: dict[str, type[Runtime]] = {
    VLLMRuntime.name: VLLMRuntime,
    TransformersRuntime.name: TransformersRuntime,
    PyTorchRuntime.name: PyTorchRuntime,
    PythonRuntime.name: PythonRuntime,
}


def available_runtimes() -> list[str]:
    """Names of the runtimes that can run here (libraries importable, device present)."""
    return [name for name, cls in RUNTIME_CLASSES.items() if cls.available()]
