"""Settings shared by every MNEMOS process: where NATS is and which namespace to use.

Read from ``MNEMOS_*`` environment variables once, at the edge (the CLI), and passed down.
"""

from __future__ import annotations

import ssl
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
    ``MNEMOS_NATS_TLS_CA`` / ``_CERT`` / ``_KEY``,
    ``MNEMOS_DATA_DIR`` (where ``mnemos up`` keeps its data: the credentials it generated
    are found there when ``MNEMOS_NATS_CREDS`` is not set)."""

    model_config = SettingsConfigDict(env_prefix="MNEMOS_", extra="ignore", frozen=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="Comma-separated NATS server URLs")
    namespace: str = Field(default="mnemos", description="Prefix of every subject, stream and bucket")
    nats_creds: str | None = Field(default=None, description="Path to a NATS credentials file")
    nats_tls_ca: str | None = Field(default=None, description="CA bundle that signed the servers' certificates")
    nats_tls_cert: str | None = Field(default=None, description="Client certificate (servers that verify clients)")
    nats_tls_key: str | None = Field(default=None, description="The client certificate's key")
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
    def tls(self) -> bool:
        """Whether connections use TLS: a ``tls://`` URL or a CA or client certificate set."""
        return bool(self.nats_tls_ca or self.nats_tls_cert) or any(u.startswith("tls://") for u in self.servers)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of every connection (None: plain TCP): the server's certificate
        verified against ``nats_tls_ca`` (else the system's CAs), with a client certificate
        when one is set."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.nats_tls_ca)
        if self.nats_tls_cert:
            context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        return context

    @property
    def names(self) -> Names:
        return Names(self.namespace)
