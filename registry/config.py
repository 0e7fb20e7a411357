"""Settings of the model registry: which artifact store new models go to, and how to reach S3.

Read from ``MNEMOS_*`` environment variables once, at the edge (the CLI or the worker's
``main``), and passed down to :class:`~registry.registry.Registry` and
:func:`~registry.store.open_store`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["RegistrySettings"]

MiB = 1024 * 1024


class RegistrySettings(BaseSettings):
    """Where model artifacts live.

    ``MNEMOS_ARTIFACT_STORE`` picks the store for newly pushed models (``nats``: the
    embedded NATS object store, the default; ``s3``: an S3 bucket via boto3). Records
    remember their own store, so models pushed to either remain readable after a switch.
    S3 credentials left unset fall back to boto3's default credential chain (env, profile,
    instance role).
    """

    model_config = SettingsConfigDict(env_prefix="MNEMOS_", extra="ignore", frozen=True)

    artifact_store: Literal["nats", "s3"] = Field(default="nats", description="Store for newly pushed models")
    s3_bucket: str | None = Field(default=None, description="S3 bucket (required when artifact_store=s3)")
    s3_endpoint_url: str | None = Field(default=None, description="S3 API endpoint (MinIO, moto, ...)")
    s3_region: str = Field(default="us-east-1", min_length=1)
    s3_prefix: str = Field(default="models", description="Key prefix inside the bucket")
    s3_access_key_id: str | None = Field(default=None, repr=False)
    s3_secret_access_key: str | None = Field(default=None, repr=False)
    #: S3 multipart part size (S3 itself raises anything below 5 MiB to 5 MiB).
    upload_chunk_bytes: int = Field(default=4 * MiB, gt=0)

    @field_validator("s3_prefix")
    @classmethod
    def _strip_prefix(cls, v: str) -> str:
        return v.strip("/")

    @model_validator(mode="after")
    def _check_store(self) -> RegistrySettings:
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("artifact_store 's3' needs s3_bucket (MNEMOS_S3_BUCKET)")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("set both s3_access_key_id and s3_secret_access_key, or neither")
        return self
