"""The HTTP gateway (``mnemos gateway``): FastAPI over the control plane's NATS API."""

from control_plane.gateway.app import create_app
from control_plane.gateway.auth import ApiKeys
from control_plane.gateway.config import GatewaySettings

__all__ = ["create_app", "ApiKeys", "GatewaySettings"]
