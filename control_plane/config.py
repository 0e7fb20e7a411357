"""Control-plane settings (``MNEMOS_CP_*``), read once by the CLI and passed in."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ControlPlaneSettings"]


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNEMOS_CP_", extra="ignore", frozen=True)

    #: Largest accepted request body; bigger ones get ``payload_too_large``.
    max_request_bytes: int = Field(default=512 * 1024, gt=0)
    #: How many requests one process handles at once (beyond it, NATS buffers them).
    max_in_flight: int = Field(default=2048, gt=0)
    #: Seconds to finish in-flight requests at shutdown.
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    #: A ``jobs.run`` job's record is written by the worker's claim; if no worker has claimed
    #: it after this long, the control plane writes the ``queued`` record (0: always at once).
    run_record_delay_s: float = Field(default=1.0, ge=0)
    #: Submissions for a runtime fail with ``queue_full`` once this many of its jobs are
    #: queued or running (approximate: counts are refreshed every ``queue_depth_refresh_s``).
    max_queued_per_runtime: int = Field(default=100_000, gt=0)
    queue_depth_refresh_s: float = Field(default=0.25, gt=0)
    #: How long finished job records are kept in KV.
    job_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    results_retention_s: float = Field(default=24 * 3600, gt=0)
    idempotency_window_s: float = Field(default=24 * 3600, gt=0)
    #: Prometheus endpoint ``http://<metrics_host>:<metrics_port>/metrics``; port 0 picks a
    #: free one, -1 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9091, ge=-1, le=65535)
