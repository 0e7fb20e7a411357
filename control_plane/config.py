"""Control-plane settings (``MNEMOS_CP_*``), read once by the CLI and passed in."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ControlPlaneSettings"]


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNEMOS_CP_", extra="ignore", frozen=True)

    #: Largest accepted request body; bigger ones get ``payload_too_large``.
    max_request_bytes: int = Field(default=512 * 1024, gt=0)
    #: How many requests one process works on at once; beyond it a request is shed at once
    #: with ``unavailable`` and a retry hint (it is never left to pile up).
    max_in_flight: int = Field(default=2048, gt=0)
    #: ``jobs.list`` requests served at once, and how many more may wait for a turn (beyond
    #: both, a listing is shed).
    max_lists_in_flight: int = Field(default=32, gt=0)
    max_lists_waiting: int = Field(default=512, ge=0)
    #: Most index entries one ``jobs.list`` looks at (a ``model`` filter may then answer a
    #: short page with a ``next_cursor``).
    list_max_scan: int = Field(default=10_000, gt=0)
    #: An attempt still running this long after its job's ``timeout_seconds`` (its worker is
    #: frozen or cannot stop it) is timed out by the control plane.
    timeout_grace_s: float = Field(default=5.0, gt=0)
    #: A ``cancelling`` job whose worker has not confirmed within this long is ``cancelled``
    #: by the control plane.
    cancel_confirm_s: float = Field(default=10.0, gt=0)
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
