"""Artifact stores: where the bytes of model files live (ENGRAM in the seeds).

Two implementations share one small interface so the registry and the worker's disk cache
never care which one holds a model:

* :class:`NatsArtifactStore` -- the JetStream object store (the embedded default), so a
  local install needs nothing but NATS.
* :class:`S3ArtifactStore` -- any S3 API through boto3, for large models in the cloud.

Objects are always streamed between a local file and the store; nothing reads a whole
model file into memory. Progress callbacks receive byte increments and always run on the
event loop thread, even when the bytes move in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    DigestMismatchError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.object_store import ObjectStore

from mnemos.errors import ArtifactError
from mnemos.messages import ArtifactLocation
from registry.config import RegistrySettings

__all__ = [
    "ArtifactStore",
    "NatsArtifactStore",
    "Progress",
    "S3ArtifactStore",
    "object_name",
    "open_store",
    "StoreClients",
]

log = logging.getLogger("mnemos.registry")

#: Called with the number of bytes moved since the previous call.
Progress = Callable[[int], None]

#: Object store chunk size: well under NATS' default 1 MiB max payload.
NATS_CHUNK_BYTES = 128 * 1024


def object_name(location: ArtifactLocation, path: str) -> str:
    """Name of the object holding model file ``path`` (relative posix path) at ``location``."""
    return f"{location.prefix}/{path}" if location.prefix else path


def _on_loop(progress: Progress | None) -> Progress | None:
    """Wrap ``progress`` so that calls from worker threads run on the current event loop."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def call(n: int) -> None:
        if n:
            loop.call_soon_threadsafe(progress, n)

    return call


class ArtifactStore(ABC):
    """A flat namespace of named objects, streamed to and from local files."""

    #: The ``ArtifactLocation.store`` value this implementation serves.
    kind: ClassVar[str]

    @abstractmethod
    async def put(self, name: str, src: Path, progress: Progress | None = None) -> None:
        """Upload the file ``src`` as object ``name``, replacing any previous object."""

    @abstractmethod
    async def get(self, name: str, dest: Path, progress: Progress | None = None) -> None:
        """Stream object ``name`` into the file ``dest`` (created or truncated).

        Raises :class:`~mnemos.errors.ArtifactError` if the object is missing or unreadable.
        """

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Delete object ``name``; deleting a missing object is not an error."""

    @abstractmethod
    def location(self, prefix: str) -> ArtifactLocation:
        """The location recorded for a model stored under the logical ``prefix``
        (``family/version``); object names are ``object_name(location, path)``."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release client resources (idempotent)."""


# ----------------------------------------------------------------------------- NATS


class _CountingReader:
    """A ``readinto`` source for the object store that reports how many bytes were read."""

    def __init__(self, f: BinaryIO, progress: Progress | None) -> None:
        self._f = f
        self._progress = progress

    def readinto(self, buffer: bytearray) -> int:
        n: int = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if self._progress is not None and n:
            self._progress(n)
        return n or 0


class _CountingWriter:
    """A ``writeinto`` target for the object store that writes to a file and reports bytes.

    It deliberately has no ``buffer`` attribute, so nats-py calls :meth:`write`.
    """

    def __init__(self, f: BinaryIO, progress: Progress | None) -> None:
        self._f = f
        self._progress = progress

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        if self._progress is not None and n:
            self._progress(n)
        return n


class NatsArtifactStore(ArtifactStore):
    """Model files in a JetStream object store bucket (created, file-backed, when missing)."""

    kind = "nats"

    def __init__(
        self, js: JetStreamContext, bucket: str, *, replicas: int = 1, chunk_bytes: int = NATS_CHUNK_BYTES
    ) -> None:
        self._js = js
        self._bucket = bucket
        self._replicas = replicas
        self._chunk_bytes = chunk_bytes
        self._obs: ObjectStore | None = None
        self._lock = asyncio.Lock()

    @property
    def bucket(self) -> str:
        return self._bucket

    def location(self, prefix: str) -> ArtifactLocation:
        return ArtifactLocation(store="nats", bucket=self._bucket, prefix=prefix.strip("/"))

    async def _store(self, create: bool) -> ObjectStore:
        """The bucket handle; created on first write (readers never create buckets)."""
        if self._obs is not None:
            return self._obs
        async with self._lock:
            if self._obs is not None:
                return self._obs
            try:
                self._obs = await self._js.object_store(self._bucket)
            except BucketNotFoundError as e:
                if not create:
                    raise ArtifactError(f"object store bucket {self._bucket!r} does not exist") from e
                self._obs = await self._create()
            except nats.errors.Error as e:
                raise ArtifactError(f"object store bucket {self._bucket!r} unavailable: {e!r}") from e
            return self._obs

    async def _create(self) -> ObjectStore:
        config = jsapi.ObjectStoreConfig(
            description="MNEMOS model artifacts",
            storage=jsapi.StorageType.FILE,
            replicas=self._replicas,
        )
        try:
            obs = await self._js.create_object_store(self._bucket, config=config)
        except BadRequestError as e:
            if e.err_code != 10058:  # created concurrently with another configuration
                raise ArtifactError(f"cannot create object store {self._bucket!r}: {e!r}") from e
            obs = await self._js.object_store(self._bucket)
        except nats.errors.Error as e:
            raise ArtifactError(f"cannot create object store {self._bucket!r}: {e!r}") from e
        log.info("created object store bucket %s", self._bucket)
        return obs

    async def put(self, name: str, src: Path, progress: Progress | None = None) -> None:
        obs = await self._store(create=True)
        meta = jsapi.ObjectMeta(name=name, options=jsapi.ObjectMetaOptions(max_chunk_size=self._chunk_bytes))
        try:
            f = await asyncio.to_thread(open, src, "rb")
            with f:
                await obs.put(name, _CountingReader(f, _on_loop(progress)), meta=meta)  # type: ignore[arg-type]
        except nats.errors.Error as e:
            raise ArtifactError(f"upload of {name!r} to object store {self._bucket!r} failed: {e!r}") from e

    async def get(self, name: str, dest: Path, progress: Progress | None = None) -> None:
        obs = await self._store(create=False)
        try:
            f = await asyncio.to_thread(open, dest, "wb")
            with f:
                # writeinto streams chunk by chunk; reading into memory is quadratic in nats-py.
                await obs.get(name, writeinto=_CountingWriter(f, _on_loop(progress)))  # type: ignore[arg-type]
        except ObjectNotFoundError as e:
            raise ArtifactError(f"object {name!r} not found in object store {self._bucket!r}") from e
        except DigestMismatchError as e:
            raise ArtifactError(f"object {name!r} in {self._bucket!r} failed its digest check") from e
        except nats.errors.Error as e:
            raise ArtifactError(f"download of {name!r} from object store {self._bucket!r} failed: {e!r}") from e

    async def delete(self, name: str) -> None:
        try:
            obs = await self._store(create=False)
        except ArtifactError as e:
            if isinstance(e.__cause__, BucketNotFoundError):
                return  # no bucket, so no object
            raise
        try:
            await obs.delete(name)
        except NotFoundError:
            log.debug("object %s already absent from %s", name, self._bucket)
        except nats.errors.Error as e:
            raise ArtifactError(f"delete of {name!r} from object store {self._bucket!r} failed: {e!r}") from e


# ----------------------------------------------------------------------------- S3


def _s3_code(e: BaseException) -> str:
    response: Any = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3ArtifactStore(ArtifactStore):
    """Model files in an S3 bucket under ``settings.s3_prefix``, via boto3.

    boto3 is synchronous, so every call runs in a thread (``asyncio.to_thread``); transfers
    use boto3's managed multipart upload/download with a progress ``Callback``.
    """

    kind = "s3"

    def __init__(self, settings: RegistrySettings, *, bucket: str | None = None) -> None:
        target = bucket or settings.s3_bucket
        if not target:
            raise ArtifactError("S3 artifact store needs a bucket (MNEMOS_S3_BUCKET)")
        self._settings = settings
        self._bucket: str = target
        self._client: Any = None
        self._transfer: Any = None
        self._bucket_ready = False
        self._lock = asyncio.Lock()

    @property
    def bucket(self) -> str:
        return self._bucket

    def location(self, prefix: str) -> ArtifactLocation:
        parts = [p for p in (self._settings.s3_prefix, prefix.strip("/")) if p]
        return ArtifactLocation(store="s3", bucket=self._bucket, prefix="/".join(parts))

    def _make_client(self) -> tuple[Any, Any]:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s = self._settings
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=s.s3_endpoint_url,
            region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key_id,
            aws_secret_access_key=s.s3_secret_access_key,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                # Custom endpoints (MinIO, moto) rarely resolve virtual-hosted bucket names.
                s3={"addressing_style": "path"} if s.s3_endpoint_url else {},
            ),
        )
        transfer = TransferConfig(
            multipart_threshold=s.upload_chunk_bytes,
            multipart_chunksize=s.upload_chunk_bytes,
            max_concurrency=4,
        )
        return client, transfer

    async def _ready(self, create_bucket: bool) -> Any:
        async with self._lock:
            if self._client is None:
                self._client, self._transfer = await asyncio.to_thread(self._make_client)
            if create_bucket and not self._bucket_ready:
                await self._call(f"ensure bucket {self._bucket!r}", self._ensure_bucket)
                self._bucket_ready = True
        return self._client

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as e:
            if _s3_code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if self._settings.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._settings.s3_region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created S3 bucket %s", self._bucket)
        except ClientError as e:
            if _s3_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a boto3 call in a thread, turning its errors into ArtifactError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as e:
            code = _s3_code(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactError(f"{what}: not found in s3://{self._bucket}") from e
            raise ArtifactError(f"{what} failed: {code or e!r}") from e
        except BotoCoreError as e:
            raise ArtifactError(f"{what} failed: {e}") from e

    async def put(self, name: str, src: Path, progress: Progress | None = None) -> None:
        client = await self._ready(create_bucket=True)
        await self._call(
            f"upload of s3://{self._bucket}/{name}",
            client.upload_file,
            str(src),
            self._bucket,
            name,
            Callback=_on_loop(progress),
            Config=self._transfer,
        )

    async def get(self, name: str, dest: Path, progress: Progress | None = None) -> None:
        client = await self._ready(create_bucket=False)
        await self._call(
            f"download of s3://{self._bucket}/{name}",
            client.download_file,
            self._bucket,
            name,
            str(dest),
            Callback=_on_loop(progress),
            Config=self._transfer,
        )

    async def delete(self, name: str) -> None:
        client = await self._ready(create_bucket=False)
        await self._call(f"delete of s3://{self._bucket}/{name}", client.delete_object, Bucket=self._bucket, Key=name)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


# ----------------------------------------------------------------------------- selection


class StoreClients:
    """One client per (store kind, bucket), opened on first use and closed together."""

    def __init__(self, open_store: Callable[[ArtifactLocation], ArtifactStore]) -> None:
        self._open = open_store
        self._stores: dict[tuple[str, str], ArtifactStore] = {}

    def get(
        self, location: ArtifactLocation, opener: Callable[[ArtifactLocation], ArtifactStore] | None = None
    ) -> ArtifactStore:
        key = (location.store, location.bucket)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = (opener or self._open)(location)
        return store

    async def close(self) -> None:
        stores, self._stores = self._stores, {}
        for store in stores.values():
            await store.close()


def open_store(
    location: ArtifactLocation, js: JetStreamContext | None, settings: RegistrySettings
) -> ArtifactStore:
    """The store holding a recorded model: the record's store and bucket, ``settings`` for
    S3 endpoint and credentials."""
    if location.store == "nats":
        if js is None:
            raise ArtifactError(f"model artifacts are in NATS bucket {location.bucket!r} but no NATS connection")
        return NatsArtifactStore(js, location.bucket)
    if location.store == "s3":
        return S3ArtifactStore(settings, bucket=location.bucket)
    raise ArtifactError(f"unknown artifact store {location.store!r}")
