"""API keys -> tenants, and the rule that an unauthenticated gateway stays on loopback."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping

from control_plane.gateway.config import GatewaySettings
from mnemos.errors import Unauthorized
from mnemos.names import validate_tenant

__all__ = ["ApiKeys", "is_loopback", "check_bind"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Bearer keys and the tenant each one acts for.

    Only sha256 digests are kept, and a lookup is by digest, so the time a check takes
    does not depend on how much of a guessed key is right.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        for key, tenant in keys.items():
            if not key:
                raise ValueError("every API key needs a non-empty key")
            validate_tenant(tenant)  # a tenant is a subject token: mnemos.tenant.<tenant>.api.*
        self._tenants = {_digest(key): tenant for key, tenant in keys.items()}

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "ApiKeys":
        """Keys from ``MNEMOS_GATEWAY_API_KEYS`` and ``MNEMOS_GATEWAY_API_KEYS_FILE`` (ValueError if malformed)."""
        keys: dict[str, str] = {}
        if settings.api_keys_file is not None:
            try:
                loaded = json.loads(settings.api_keys_file.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read API keys from {settings.api_keys_file}: {e}") from e
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
            ):
                raise ValueError(f'{settings.api_keys_file} must hold a JSON object {{"<key>": "<tenant>"}}')
            keys.update(loaded)
        for pair in (settings.api_keys or "").split(","):
            if not pair.strip():
                continue
            key, sep, tenant = pair.strip().partition("=")
            if not sep:
                raise ValueError("MNEMOS_GATEWAY_API_KEYS must be comma-separated key=tenant pairs")
            keys[key.strip()] = tenant.strip()
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    @property
    def tenants(self) -> set[str]:
        return set(self._tenants.values())

    def tenant(self, key: str | None) -> str | None:
        """The tenant of a bearer key; None when no keys are configured."""
        if not self._tenants:
            return None
        if not key:
            raise Unauthorized("send an API key: Authorization: Bearer <key>")
        tenant = self._tenants.get(_digest(key))
        if tenant is None:
            raise Unauthorized("unknown API key")
        return tenant


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: ApiKeys) -> None:
    """Refuse (ValueError) to serve a non-loopback address without API keys."""
    if not keys.enabled and not is_loopback(host):
        raise ValueError(
            f"refusing to serve {host} without API keys: set MNEMOS_GATEWAY_API_KEYS or "
            "MNEMOS_GATEWAY_API_KEYS_FILE, or bind to 127.0.0.1"
        )
