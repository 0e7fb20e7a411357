"""MNEMOS model registry: model records in NATS KV, model files in an artifact store.

The registry (GENOME in the seeds) and the artifact stores (ENGRAM) are a library used by
the ``mnemos models ...`` CLI, the control plane (to resolve models) and workers (to
download them through their disk cache).
"""

from registry.config import RegistrySettings
from registry.registry import ModelDeleted, PushProgress, Registry, parse_model_name, scan_directory
from registry.store import (
    ArtifactStore,
    NatsArtifactStore,
    Progress,
    S3ArtifactStore,
    object_name,
    open_store,
)

__all__ = [
    "ArtifactStore",
    "ModelDeleted",
    "NatsArtifactStore",
    "Progress",
    "PushProgress",
    "Registry",
    "RegistrySettings",
    "S3ArtifactStore",
    "object_name",
    "open_store",
    "parse_model_name",
    "scan_directory",
]
