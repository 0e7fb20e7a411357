"""Worker settings (``MNEMOS_WORKER_*``), read once by the CLI and passed in."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mnemos.names import RUNTIMES

__all__ = ["WorkerSettings", "default_worker_id"]


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "worker"
    return f"{host}-{os.urandom(3).hex()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNEMOS_WORKER_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    #: ``MNEMOS_WORKER_ID`` (default: hostname plus a random suffix).
    worker_id: str = Field(
        default_factory=default_worker_id,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        validation_alias=AliasChoices("MNEMOS_WORKER_ID"),
    )
    #: Runtimes to serve; empty means every runtime that can run here.
    runtimes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_concurrent_jobs: int = Field(default=4, ge=1, le=4096)
    heartbeat_interval_s: float = Field(default=5.0, ge=1.0, le=300)
    #: JetStream ack wait; running jobs send "in progress" every third of it.
    ack_wait_s: float = Field(default=30.0, ge=3.0)
    #: With nothing queued the worker waits for the dispatch doorbell; this is only the
    #: safety-net re-check (after reconnects), not a poll interval.
    idle_recheck_s: float = Field(default=10.0, gt=0)
    cache_dir: Path = Field(default=Path.home() / ".cache" / "mnemos" / "models")
    cache_budget_gb: float = Field(default=50.0, gt=0)
    max_loaded_models: int = Field(default=2, ge=1)
    model_memory_budget_mb: float | None = Field(default=None, gt=0)
    model_load_timeout_s: float = Field(default=600.0, gt=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)
    #: Recycling (Neutrino's rule): drain and exit after this many jobs / this RSS / this age,
    #: checked after each job and, while the worker is idle, at each heartbeat.
    max_jobs: int | None = Field(default=None, ge=1)
    max_rss_mb: float | None = Field(default=None, gt=0)
    max_lifetime_s: float | None = Field(default=None, gt=0)
    #: Streamed text arriving within this many ms of the last chunk is merged into the next
    #: chunk (the first token is always sent at once). 0: one message per token.
    stream_interval_ms: float = Field(default=20.0, ge=0, le=1000)
    #: A ``jobs.run`` job (no record written yet) on a loaded model runs before its claim
    #: is written; the claim is written with the result, or once the run has lasted this
    #: many ms. 0: always write the claim before running.
    claim_delay_ms: float = Field(default=50.0, ge=0, le=1000)
    #: Warm routing: a job for a model that another live worker of its runtime holds (and
    #: has a free slot for) is left to that worker this many ms before this one takes it
    #: (``neuron_runtime/affinity.py``). 0: no deferral (warm models are still pulled first).
    spill_delay_ms: float = Field(default=20.0, ge=0, le=1000)
    #: PyTorch intra-op threads for CPU inference; default: all cores but one, which is
    #: left to the event loop and NATS (for small models fewer threads are also faster).
    torch_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1), ge=1)
    tags: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    #: Prometheus endpoint ``http://<metrics_host>:<metrics_port>/metrics``, advertised in
    #: the worker record's ``tags["metrics"]``; port 0 picks a free one, -1 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9092, ge=-1, le=65535)
    version: str = "0.1.0"

    @field_validator("runtimes", mode="before")
    @classmethod
    def _split_runtimes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [r.strip() for r in v.split(",") if r.strip()]
        for r in v:
            if r not in RUNTIMES:
                raise ValueError(f"unknown runtime {r!r}; known: {', '.join(RUNTIMES)}")
        return v

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, v: Any) -> Any:
        if isinstance(v, str):
            pairs = [p.split("=", 1) for p in v.split(",") if "=" in p]
            return {k.strip(): val.strip() for k, val in pairs}
        return v

    @property
    def heartbeat_ttl_s(self) -> int:
        """A worker record expires after three missed heartbeats."""
        return max(1, int(3 * self.heartbeat_interval_s + 0.999))
