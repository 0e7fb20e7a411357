"""Gateway settings (``MNEMOS_GATEWAY_*``), read once by the CLI and passed in."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["GatewaySettings"]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNEMOS_GATEWAY_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: API keys as ``key=tenant`` pairs separated by commas. With neither this nor
    #: ``api_keys_file`` the gateway serves without authentication, on loopback only.
    api_keys: str | None = None
    #: A JSON object ``{"<key>": "<tenant>", ...}`` (mode 0600 recommended).
    api_keys_file: Path | None = None
    #: Tenants (of API keys) that act as the operator: they may manage the autoscaler's
    #: pools (``/v1/pools``) and the tenants' quotas (``/v1/tenants``). Comma-separated.
    #: Without API keys (loopback) every caller is the operator.
    operator_tenants: str = ""
    #: Largest request body accepted; bigger ones get 413 ``payload_too_large``.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    #: Upper bound of ``POST /v1/jobs?wait=SECONDS``.
    max_wait_s: float = Field(default=300.0, gt=0)
    #: Timeout of each control-plane request.
    request_timeout_s: float = Field(default=10.0, gt=0)
    #: ``timeout_seconds`` of the jobs behind OpenAI-compatible requests.
    openai_job_timeout_s: float = Field(default=300.0, gt=0)
    #: A comment line is sent on an idle event stream this often (keeps proxies from closing it).
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    #: ``Retry-After`` seconds sent with 429 and 503 answers.
    retry_after_s: int = Field(default=1, ge=0)
