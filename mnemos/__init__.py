"""MNEMOS wire contract (names, messages, errors) and client SDK.

The public names below are imported on first use (PEP 562), so a process that needs only
part of the package (a worker, the control plane) does not pay for the SDK's imports: a
fresh worker's start is mostly imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mnemos.app import Actor, App, Cls, Function, FunctionCall, batched, configure, enter, method, model_path
    from mnemos.client import Client, job_spec
    from mnemos.config import NatsSettings
    from mnemos.errors import (
        JobNotFound,
        JobTimeout,
        MnemosError,
        NotConnected,
        QueueFull,
        QuotaExceeded,
        Unavailable,
        ValidationFailed,
    )
    from mnemos.messages import JobRecord, JobSpec, ResultChunk, ResultFinal, ResultStatus
    from mnemos.names import Names
    from mnemos.sync import SyncClient

_WHERE = {
    **dict.fromkeys(["Actor", "App", "Cls", "Function", "FunctionCall", "batched", "configure", "enter", "method",
                     "model_path"], "mnemos.app"),
    **dict.fromkeys(["Client", "job_spec"], "mnemos.client"),
    "NatsSettings": "mnemos.config",
    **dict.fromkeys(["JobNotFound", "JobTimeout", "MnemosError", "NotConnected", "QueueFull", "QuotaExceeded",
                     "Unavailable",
                     "ValidationFailed"], "mnemos.errors"),
    **dict.fromkeys(["JobRecord", "JobSpec", "ResultChunk", "ResultFinal", "ResultStatus"], "mnemos.messages"),
    "Names": "mnemos.names",
    "SyncClient": "mnemos.sync",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mnemos' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "App",
    "Function",
    "Cls",
    "Actor",
    "FunctionCall",
    "enter",
    "method",
    "batched",
    "configure",
    "model_path",
    "Client",
    "SyncClient",
    "job_spec",
    "NatsSettings",
    "MnemosError",
    "JobNotFound",
    "JobTimeout",
    "NotConnected",
    "QueueFull",
    "QuotaExceeded",
    "Unavailable",
    "ValidationFailed",
    "JobRecord",
    "JobSpec",
    "ResultChunk",
    "ResultFinal",
    "ResultStatus",
    "Names",
]
