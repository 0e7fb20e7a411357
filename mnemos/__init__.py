"""MNEMOS wire contract (names, messages, errors) and client SDK."""

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.errors import MnemosError
from mnemos.messages import JobRecord, JobSpec, ResultChunk, ResultFinal
from mnemos.names import Names

__all__ = [
    "Client",
    "job_spec",
    "NatsSettings",
    "MnemosError",
    "JobRecord",
    "JobSpec",
    "ResultChunk",
    "ResultFinal",
    "Names",
]
