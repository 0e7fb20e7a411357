"""The MNEMOS control plane (CORTEX): job API over NATS, validation, dispatch, state."""

from control_plane.config import ControlPlaneSettings
from control_plane.service import ControlPlane

__all__ = ["ControlPlane", "ControlPlaneSettings"]
