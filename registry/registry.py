"""The model registry (GENOME in the seeds): model records in KV, model bytes in a store.

A model is a directory of files. :meth:`Registry.push` hashes every file (sha256 + size),
uploads each to the artifact store as ``<family>/<version>/<path>`` and then writes a
:class:`~mnemos.messages.ModelRecord` to the ``<ns>_models`` KV bucket under
``<family>.<version>`` with a compare-and-set, so two pushes of one version cannot both
win. Workers later download the files through their disk cache and verify every sha256
against the record, so a record is the single source of truth for what a model is.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mnemos.kvscan import kv_values
from mnemos.errors import ArtifactError, Conflict, ModelNotFound, Unavailable, ValidationFailed
from mnemos.layout import LayoutOptions, ensure_layout
from mnemos.messages import ArtifactLocation, Family, ModelFile, ModelRecord, Version, decode, encode, utcnow
from mnemos.names import Names, model_key, model_name
from mnemos.runtime_config import parse_runtime_config
from registry.config import RegistrySettings
from registry.store import ArtifactStore, NatsArtifactStore, StoreClients, object_name, open_store

__all__ = ["ModelDeleted", "PushProgress", "Registry", "parse_model_name", "scan_directory"]

log = logging.getLogger("mnemos.registry")

#: ``(file path, bytes moved since the last call, file size)`` during :meth:`Registry.push`.
PushProgress = Callable[[str, int, int], None]

_HASH_BLOCK = 1024 * 1024
_UPLOAD_CONCURRENCY = 4
_KV_TIMEOUT_S = 5.0
_SCAN_CONSUMER_INACTIVE_S = 2.0
#: Editor and download leftovers that never belong to a model.
_TEMP_SUFFIXES = ("~", ".tmp", ".swp", ".part", ".partial", ".lock")
_ALIAS_MAX = 160


@dataclass(frozen=True, slots=True)
class ModelDeleted:
    """A :meth:`Registry.watch` event: the record under ``key`` was deleted or purged."""

    key: str


# ----------------------------------------------------------------------------- helpers


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _skipped(rel_parts: tuple[str, ...]) -> bool:
    """Hidden files/directories (``.git``, ``.cache``) and temp leftovers are not model files."""
    return any(p.startswith(".") for p in rel_parts) or rel_parts[-1].endswith(_TEMP_SUFFIXES)


def scan_directory(model_dir: Path) -> list[ModelFile]:
    """Every model file under ``model_dir`` with its size and sha256, sorted by path.

    Regular files only (symlinks to files are followed, as in Hugging Face snapshots);
    paths are relative and posix-style. Hashing streams each file, so it is safe for
    multi-GB weights; call it in a thread from async code.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ValidationFailed(f"model directory {str(root)!r} does not exist or is not a directory")
    files: list[ModelFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            full = Path(dirpath) / fname
            rel = full.relative_to(root)
            if _skipped(rel.parts) or not full.is_file():
                continue
            files.append(ModelFile(path=rel.as_posix(), size=full.stat().st_size, sha256=_file_sha256(full)))
    if not files:
        raise ValidationFailed(f"model directory {str(root)!r} holds no model files")
    files.sort(key=lambda f: f.path)
    return files


def parse_model_name(name: str) -> tuple[str, str] | None:
    """``(family, version)`` if ``name`` is a valid ``family:version``, else None."""
    family, sep, version = name.partition(":")
    if not sep:
        return None
    try:
        msgspec.convert(family, Family)
        msgspec.convert(version, Version)
    except msgspec.ValidationError:
        return None
    return family, version


def _validated(record: ModelRecord) -> ModelRecord:
    """``record`` decoded strictly from its own JSON: every pattern and range is checked."""
    try:
        return decode(encode(record), ModelRecord)
    except ValidationFailed as e:
        raise ValidationFailed(f"invalid model record {record.family}:{record.version}: {e}") from e


def _check_aliases(aliases: list[str]) -> None:
    """Aliases are free-form names, but never ``family:version``-shaped, so a name that
    parses as a model name always means that model."""
    seen: set[str] = set()
    for alias in aliases:
        if not alias or len(alias) > _ALIAS_MAX or any(c.isspace() for c in alias):
            raise ValidationFailed(f"alias {alias!r} must be 1-{_ALIAS_MAX} characters without whitespace")
        if parse_model_name(alias) is not None:
            raise ValidationFailed(f"alias {alias!r} looks like a family:version model name")
        if alias in seen:
            raise ValidationFailed(f"alias {alias!r} is listed twice")
        seen.add(alias)


@contextmanager
def _nats_errors(action: str) -> Iterator[None]:
    """Turn NATS transport failures into :class:`~mnemos.errors.Unavailable`."""
    try:
        yield
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as e:
        raise Unavailable(f"{action}: NATS did not answer ({type(e).__name__})") from e


# ----------------------------------------------------------------------------- registry


class Registry:
    """Model records in the namespace's models KV bucket and their files in artifact stores.

    Use as ``async with Registry(js, names, settings) as reg:`` or call :meth:`start`.
    """

    def __init__(
        self, js: JetStreamContext, names: Names, settings: RegistrySettings, *, replicas: int = 1
    ) -> None:
        self._js = js
        self._names = names
        self._settings = settings
        #: JetStream replicas for buckets the registry creates (3 on a cluster).
        self._replicas = replicas
        self._kv: KeyValue | None = None
        self._stores = StoreClients(lambda location: open_store(location, self._js, self._settings))

    async def start(self) -> None:
        """Open the models bucket, creating the namespace layout if it is missing (idempotent)."""
        if self._kv is not None:
            return
        with _nats_errors("open models bucket"):
            try:
                self._kv = await self._js.key_value(self._names.models_bucket)
            except BucketNotFoundError:
                layout = await ensure_layout(self._js, self._names, LayoutOptions(replicas=self._replicas))
                self._kv = layout.models

    async def stop(self) -> None:
        """Release store clients (idempotent)."""
        await self._stores.close()
        self._kv = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("Registry.start() was not called")
        return self._kv

    # -- stores ------------------------------------------------------------------------
    def default_store(self, kind: str | None = None) -> ArtifactStore:
        """The store new models go to: ``kind`` or the configured ``artifact_store``."""
        kind = kind or self._settings.artifact_store
        if kind == "nats":
            location = ArtifactLocation(store="nats", bucket=self._names.artifacts_bucket, prefix="")
            return self._stores.get(
                location, lambda loc: NatsArtifactStore(self._js, loc.bucket, replicas=self._replicas)
            )
        if kind == "s3":
            if not self._settings.s3_bucket:
                raise ValidationFailed("store 's3' needs s3_bucket (MNEMOS_S3_BUCKET)")
            return self.store_for(ArtifactLocation(store="s3", bucket=self._settings.s3_bucket, prefix=""))
        raise ValidationFailed(f"unknown artifact store {kind!r}; use 'nats' or 's3'")

    def store_for(self, location: ArtifactLocation) -> ArtifactStore:
        """The store holding the files at ``location`` (one client per store and bucket)."""
        return self._stores.get(location)

    # -- reading -----------------------------------------------------------------------
    async def _read(self, family: str, version: str) -> tuple[ModelRecord, int] | None:
        key = model_key(family, version)
        with _nats_errors(f"read model {key}"):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                return None
        if entry.value is None or entry.revision is None:
            return None
        try:
            return decode(entry.value, ModelRecord), entry.revision
        except ValidationFailed as e:
            raise ValidationFailed(f"model record {key} in {self._names.models_bucket} is malformed: {e}") from e

    async def _scan(self) -> builtins.list[tuple[ModelRecord, int]]:
        """Every current record with its revision (one watcher, not one read per key)."""
        current: builtins.list[tuple[ModelRecord, int]] = []
        with _nats_errors("list models"):
            async for key, value, revision in kv_values(self.kv):
                try:
                    current.append((decode(value, ModelRecord), revision))
                except ValidationFailed as e:
                    log.error("skipping malformed model record %s: %s", key, e)
        return current

    async def _resolve(self, name: str) -> tuple[ModelRecord, int]:
        ref = parse_model_name(name)
        if ref is not None:  # aliases never parse as family:version, so no scan is needed
            found = await self._read(*ref)
            if found is not None:
                return found
            raise ModelNotFound(f"model {name!r} is not registered")
        for record, revision in await self._scan():
            if name in record.aliases:
                return record, revision
        raise ModelNotFound(f"model {name!r} is not registered (neither a family:version nor an alias)")

    async def get(self, name: str) -> ModelRecord:
        """The model named ``family:version`` or by one of its aliases."""
        await self.start()
        record, _ = await self._resolve(name)
        return record

    async def list(self) -> builtins.list[ModelRecord]:
        """Every registered model, sorted by family and version."""
        await self.start()
        records = [r for r, _ in await self._scan()]
        records.sort(key=lambda r: (r.family, r.version))
        return records

    async def watch(self) -> AsyncGenerator[ModelRecord | ModelDeleted, None]:
        """Current records, then every change as it happens.

        Close it when done (``async with contextlib.aclosing(reg.watch()) as events:``) so the
        underlying KV watcher stops at once.
        """
        await self.start()
        with _nats_errors("watch models"):
            watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation is not None or not entry.value:
                    yield ModelDeleted(key=entry.key)
                    continue
                try:
                    yield decode(entry.value, ModelRecord)
                except ValidationFailed as e:
                    log.error("skipping malformed model record %s: %s", entry.key, e)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    # -- writing -----------------------------------------------------------------------
    async def _check_aliases_free(self, family: str, version: str, aliases: builtins.list[str]) -> None:
        """Each alias names exactly one model."""
        wanted = set(aliases)
        if not wanted:
            return
        for other, _ in await self._scan():
            if other.family == family and other.version == version:
                continue
            clash = wanted.intersection(other.aliases)
            if clash:
                raise Conflict(f"alias {min(clash)!r} already belongs to {other.name}")

    async def push(
        self,
        model_dir: Path,
        *,
        family: str,
        version: str,
        runtime: str,
        runtime_config: dict[str, Any] | None = None,
        aliases: builtins.list[str] | None = None,
        description: str = "",
        store: str | None = None,
        progress: PushProgress | None = None,
        force: bool = False,
    ) -> ModelRecord:
        """Upload ``model_dir`` and register it as ``family:version``.

        Everything is validated before the first byte moves. Pushing a version that exists
        raises :class:`~mnemos.errors.Conflict` unless ``force``, which replaces the record
        (a compare-and-set on its revision) and removes objects the new version dropped.
        """
        await self.start()
        runtime_config = dict(runtime_config or {})
        aliases = builtins.list(aliases or [])
        parse_runtime_config(runtime, runtime_config)
        target = self.default_store(store)
        location = target.location(f"{family}/{version}")
        draft = ModelRecord(
            family=family,
            version=version,
            runtime=runtime,  # type: ignore[arg-type]
            artifact=location,
            files=[],
            total_size=0,
            created_at=utcnow(),
            runtime_config=runtime_config,
            aliases=aliases,
            description=description,
        )
        _validated(draft)
        _check_aliases(aliases)
        key = model_key(family, version)
        existing = await self._read(family, version)
        if existing is not None and not force:
            raise Conflict(f"model {model_name(family, version)} already exists; push with force to replace it")
        await self._check_aliases_free(family, version, aliases)

        files = await asyncio.to_thread(scan_directory, Path(model_dir))
        total = sum(f.size for f in files)
        log.info("pushing %s: %d files, %d bytes to %s://%s/%s", draft.name, len(files), total,
                 location.store, location.bucket, location.prefix)
        await self._upload(Path(model_dir), files, target, location, progress)

        record = _validated(
            msgspec.structs.replace(draft, files=files, total_size=total, created_at=utcnow())
        )
        value = encode(record)
        with _nats_errors(f"write model {key}"):
            try:
                if existing is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=existing[1])
            except KeyWrongLastSequenceError as e:
                raise Conflict(f"model {record.name} was registered concurrently; push again") from e
        if existing is not None:
            await self._purge_dropped(existing[0], record)
        log.info("registered %s (%s runtime, %d files, %d bytes)", record.name, runtime, len(files), total)
        return record

    async def _upload(
        self,
        root: Path,
        files: builtins.list[ModelFile],
        store: ArtifactStore,
        location: ArtifactLocation,
        progress: PushProgress | None,
    ) -> None:
        gate = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

        async def one(f: ModelFile) -> None:
            def report(n: int) -> None:
                if progress is not None:
                    progress(f.path, n, f.size)

            async with gate:
                await store.put(object_name(location, f.path), root / f.path, report)

        try:
            async with asyncio.TaskGroup() as tg:
                for f in files:
                    tg.create_task(one(f))
        except BaseExceptionGroup as eg:
            first = eg.exceptions[0]
            if isinstance(first, ArtifactError):
                raise ArtifactError(f"{first.message} (model not registered)") from first
            if isinstance(first, OSError):
                raise ArtifactError(f"cannot read {first.filename}: {first.strerror}") from first
            raise

    async def _purge_dropped(self, old: ModelRecord, new: ModelRecord) -> None:
        """Delete objects of ``old`` that ``new`` no longer references."""
        keep = {(new.artifact.store, new.artifact.bucket, object_name(new.artifact, f.path)) for f in new.files}
        store = self.store_for(old.artifact)
        for f in old.files:
            name = object_name(old.artifact, f.path)
            if (old.artifact.store, old.artifact.bucket, name) not in keep:
                await store.delete(name)

    async def delete(self, name: str, purge_artifacts: bool = True) -> ModelRecord:
        """Unregister a model (by name or alias) and, by default, delete its files."""
        await self.start()
        record, revision = await self._resolve(name)
        key = model_key(record.family, record.version)
        with _nats_errors(f"delete model {key}"):
            try:
                await self.kv.delete(key, last=revision)
            except APIError as e:
                if e.err_code in (10071, 10164):
                    raise Conflict(f"model {record.name} changed while being deleted; try again") from e
                raise
        if purge_artifacts:
            store = self.store_for(record.artifact)
            for f in record.files:
                await store.delete(object_name(record.artifact, f.path))
        log.info("deleted %s%s", record.name, " and its artifacts" if purge_artifacts else "")
        return record
