"""Autoscaler settings (``MNEMOS_AUTOSCALER_*``), read once by the CLI and passed in."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AutoscalerSettings"]


class AutoscalerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNEMOS_AUTOSCALER_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    #: The NATS credentials the workers it starts get (``MNEMOS_WORKER_NATS_CREDS``, as
    #: ``mnemos up`` names each role's file); unset: the autoscaler's own.
    worker_nats_creds: str | None = Field(
        default=None, validation_alias=AliasChoices("MNEMOS_WORKER_NATS_CREDS", "worker_nats_creds"))

    #: This instance's name in the lease and in each pool's status (default: host + pid).
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: How often the acting autoscaler looks at the queues and workers. Work that waits is
    #: seen within one tick, and a worker is asked for in the same tick.
    tick_s: float = Field(default=0.2, gt=0, le=10)
    #: The leader lease: it expires this long after its last renewal (a standby takes over
    #: then), and is renewed every ``lease_renew_s``.
    lease_ttl_s: int = Field(default=3, ge=1, le=300)
    lease_renew_s: float = Field(default=1.0, gt=0)
    #: A ready worker whose record expired (no heartbeat: a stalled process, a machine cut
    #: off from NATS) is stopped only after this long; one that heartbeats again meanwhile
    #: is ready again. (Its jobs are recovered by the control plane either way.)
    silent_grace_s: float = Field(default=120.0, ge=0)
    #: Where the ``local`` provider keeps track of the worker processes it started (shared
    #: by every autoscaler on this machine, so one that takes over finds them).
    state_dir: Path = Field(default=Path.home() / ".cache" / "mnemos" / "autoscaler")
    #: The ``local`` provider forks workers from a pre-started process that has imported
    #: the runtimes (much faster cold starts); off: a fresh process per worker.
    local_zygote: bool = True
    #: A pool's status is written when it changes, and at least this often.
    status_every_s: float = Field(default=2.0, gt=0)
    #: How many decisions a pool's status keeps.
    decisions_kept: int = Field(default=30, ge=1, le=1000)
    #: How long a worker has to answer a ``drain_if_idle`` command.
    command_timeout_s: float = Field(default=2.0, gt=0)
    #: Prometheus endpoint; port 0 picks a free one, -1 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9095, ge=-1, le=65535)

    @model_validator(mode="after")
    def _renew_within_the_ttl(self) -> AutoscalerSettings:
        # The holder acts only while its last renewal is younger than TTL - max(0.5, TTL/4).
        if self.lease_renew_s >= self.lease_ttl_s - max(0.5, self.lease_ttl_s / 4):
            raise ValueError(f"lease_renew_s ({self.lease_renew_s:g}) must be shorter than lease_ttl_s "
                             f"({self.lease_ttl_s}) minus its margin")
        return self
