"""MNEMOS wire contract (names, messages, errors) and client SDK."""

from mnemos.app import Actor, App, Cls, Function, FunctionCall, batched, configure, enter, method, model_path
from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.errors import (
    JobNotFound,
    JobTimeout,
    MnemosError,
    NotConnected,
    QueueFull,
    Unavailable,
    ValidationFailed,
)
from mnemos.messages import JobRecord, JobSpec, ResultChunk, ResultFinal, ResultStatus
from mnemos.names import Names
from mnemos.sync import SyncClient

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
    "Unavailable",
    "ValidationFailed",
    "JobRecord",
    "JobSpec",
    "ResultChunk",
    "ResultFinal",
    "ResultStatus",
    "Names",
]
