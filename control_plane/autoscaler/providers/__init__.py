"""Worker providers: where the autoscaler's workers come from (one module each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from control_plane.autoscaler.providers.base import (
    ProvidedWorker,
    Provider,
    ProviderError,
    ProviderView,
    WorkerLaunch,
)

__all__ = ["Provider", "ProvidedWorker", "ProviderView", "WorkerLaunch", "ProviderError", "PROVIDERS", "make_provider"]


def _local(**kwargs: Any) -> Provider:
    from control_plane.autoscaler.providers.local import LocalProvider

    return LocalProvider(**kwargs)


def _aws(**kwargs: Any) -> Provider:
    from control_plane.autoscaler.providers.aws import AwsProvider

    return AwsProvider(**kwargs)


#: Provider name (a pool's ``provider``) -> factory. Imported lazily: boto3 only when used.
PROVIDERS: dict[str, Callable[..., Provider]] = {"local": _local, "aws": _aws}


def make_provider(name: str, **kwargs: Any) -> Provider:
    try:
        factory = PROVIDERS[name]
    except KeyError:
        raise ProviderError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    return factory(**kwargs)
