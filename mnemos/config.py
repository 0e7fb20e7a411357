"""Settings shared by every MNEMOS process: where NATS is and which namespace to use.

Read from ``MNEMOS_*`` environment variables once, at the edge (the CLI), and passed down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mnemos.names import Names, validate_prefix

__all__ = ["NatsSettings", "LOCAL_USER"]

#: The user whose credentials the CLI and SDK find in ``mnemos up``'s data directory: the
#: operator (whoever ran ``mnemos up`` owns the stack).
LOCAL_USER = "operator"


class NatsSettings(BaseSettings):
    """How to reach NATS. ``MNEMOS_NATS_URL``, ``MNEMOS_NAMESPACE``, ``MNEMOS_NATS_CREDS``,
    ``MNEMOS_DATA_DIR`` (where ``mnemos up`` keeps its data: the credentials it generated
    are found there when ``MNEMOS_NATS_CREDS`` is not set)."""

    model_config = SettingsConfigDict(env_prefix="MNEMOS_", extra="ignore", frozen=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="Comma-separated NATS server URLs")
    namespace: str = Field(default="mnemos", description="Prefix of every subject, stream and bucket")
    nats_creds: str | None = Field(default=None, description="Path to a NATS credentials file")
    data_dir: Path = Field(default=Path(".mnemos"), description="The data directory of `mnemos up`")
    nats_connect_timeout_s: float = Field(default=5.0, gt=0)
    #: JetStream replicas for buckets and streams (3 on a cluster).
    replicas: int = Field(default=1, ge=1, le=5)

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, v: str) -> str:
        return validate_prefix(v)

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def creds_file(self) -> Path | None:
        """The credentials to connect with: ``nats_creds``, else the operator's that
        ``mnemos up`` generated in ``data_dir`` (when there are), else none."""
        if self.nats_creds:
            return Path(self.nats_creds)
        local = self.data_dir / "auth" / "creds" / f"{LOCAL_USER}.creds"
        return local if local.is_file() else None

    @property
    def names(self) -> Names:
        return Names(self.namespace)
