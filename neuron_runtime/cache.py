"""The worker's disk tier of the warm cache: model artifacts on local disk, LRU by a byte budget.

Layout under ``root``::

    <family>/<version>-<digest12>/      a complete model (has ``.mnemos-complete``)
    .partial/<pid>-<token>/             this process's downloads in progress and directories
                                        being evicted

``digest12`` is a hash of the record's ``(path, sha256)`` list, so a force-pushed version
with other bytes lands in another directory. A model is downloaded into ``.partial``,
every file's size and sha256 is checked against the record, the marker is written and only
then is the directory renamed into place: a half-written or corrupt model is never served,
and a crash leaves only ``.partial`` garbage, removed at the next start.

Several workers on one machine may share ``root`` (``mnemos up``'s local workers do): each
downloads under its own ``.partial/<pid>-<token>``, a start removes only the leftovers of
processes that are gone, and a model another worker has put in place while this one was
downloading it is taken as it is (this copy is dropped). A checkout holds a shared
``flock`` on the model directory's ``.mnemos-pin``; eviction takes it exclusively without
waiting and skips a model another process has checked out. (The byte budget is each
process's own: workers sharing a directory should share the budget between them.)
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

import msgspec
import psutil

from mnemos.errors import ArtifactError
from mnemos.messages import ArtifactLocation, ModelFile, ModelRecord
from registry.store import ArtifactStore, StoreClients, object_name

__all__ = ["MARKER", "CacheEntry", "DiskCache", "content_digest"]

log = logging.getLogger("mnemos.cache")

MARKER = ".mnemos-complete"
#: In each model directory: held shared (``flock``) by every process that has the model
#: checked out, so a worker sharing the cache never evicts a model another is loading.
PIN = ".mnemos-pin"
PARTIAL = ".partial"
_HASH_BLOCK = 1024 * 1024
_DOWNLOAD_CONCURRENCY = 4


def content_digest(record: ModelRecord) -> str:
    """First 12 hex chars of a sha256 over the record's sorted ``(path, sha256)`` list."""
    h = hashlib.sha256()
    for f in sorted(record.files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A checked-out model: its directory, whether it was already on disk, and its bytes."""

    path: Path
    hit: bool
    size: int


class _Marker(msgspec.Struct, forbid_unknown_fields=True, tag="io.mnemos.v1.cache_marker", tag_field="type"):
    """Contents of ``.mnemos-complete``: enough to rebuild the index after a restart."""

    name: str
    digest: str
    size: int
    files: int


@dataclass
class _Slot:
    key: str
    path: Path
    size: int
    last_used: int
    pins: int = 0
    name: str = field(default="")


def _pin(model_dir: Path) -> int | None:
    """Hold ``model_dir``'s pin shared (an fd to close to let go); None if the directory is
    gone (evicted by another worker meanwhile)."""
    try:
        fd = os.open(model_dir / PIN, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction moves the directory away
    if not (model_dir / MARKER).exists():  # it was moved while this waited
        os.close(fd)
        return None
    return fd


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: ModelFile) -> None:
    size = path.stat().st_size
    if size != expected.size:
        raise ArtifactError(f"{expected.path}: downloaded {size} bytes, the record says {expected.size}")
    digest = _file_sha256(path)
    if digest != expected.sha256:
        raise ArtifactError(f"{expected.path}: sha256 {digest} does not match the record's {expected.sha256}")


def _safe_relpath(path: str) -> PurePosixPath:
    """A record's file path, refused if it could escape the model directory."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ArtifactError(f"refusing unsafe file path {path!r} in model record")
    return p


class DiskCache:
    """Model directories on local disk, downloaded once, verified, evicted least-recently-used.

    ``open_store`` maps a record's :class:`~mnemos.messages.ArtifactLocation` to the store
    holding its files (one store per store kind and bucket is kept). Counters ``hits``,
    ``misses`` (checkouts that had to download), ``download_failures``, ``bytes_downloaded``
    and ``evictions`` are plain attributes for metrics.
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int,
        open_store: Callable[[ArtifactLocation], ArtifactStore],
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.root = Path(root)
        #: This process's own part of ``.partial`` (workers may share ``root``).
        self._scratch = self.root / PARTIAL / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.budget_bytes = budget_bytes
        self._stores = StoreClients(open_store)
        self._slots: dict[str, _Slot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._clock = itertools.count(1)
        self._started = False
        self._start_lock = asyncio.Lock()
        self.hits = 0
        self.misses = 0
        self.bytes_downloaded = 0
        self.evictions = 0
        self.download_failures = 0

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Remove ``.partial`` leftovers and index complete model directories (idempotent)."""
        async with self._start_lock:
            if self._started:
                return
            await asyncio.to_thread(self._recover)
            self._started = True
        await self._evict(incoming=0, loading=None)
        log.info(
            "disk cache at %s: %d models, %d of %d bytes", self.root, len(self._slots), self.usage_bytes,
            self.budget_bytes,
        )

    async def stop(self) -> None:
        """Close store clients and remove this process's scratch space (idempotent). Model
        directories stay for the next start."""
        await self._stores.close()
        await asyncio.to_thread(shutil.rmtree, self._scratch, ignore_errors=True)
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _recover(self) -> None:
        partial = self.root / PARTIAL
        partial.mkdir(parents=True, exist_ok=True)
        for leftover in partial.iterdir():  # another live worker's downloads are not garbage
            pid = leftover.name.split("-", 1)[0]
            if leftover.name == self._scratch.name or (pid.isdigit() and psutil.pid_exists(int(pid))):
                continue
            shutil.rmtree(leftover, ignore_errors=True)
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._slots.clear()
        found: list[tuple[float, Path, _Marker]] = []
        for family_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for model_dir in sorted(p for p in family_dir.iterdir() if p.is_dir()):
                marker = model_dir / MARKER
                try:
                    info = msgspec.json.decode(marker.read_bytes(), type=_Marker)
                except FileNotFoundError:
                    log.warning("ignoring incomplete cache directory %s (no %s)", model_dir, MARKER)
                    continue
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    log.warning("ignoring cache directory %s: unreadable marker (%s)", model_dir, e)
                    continue
                found.append((marker.stat().st_mtime, model_dir, info))
        # Marker mtimes carry recency across restarts (a hit touches the marker).
        for _, model_dir, info in sorted(found, key=lambda t: t[0]):
            key = str(model_dir)
            self._slots[key] = _Slot(key=key, path=model_dir, size=info.size, last_used=next(self._clock),
                                     name=info.name)

    # -- queries -----------------------------------------------------------------------
    @property
    def usage_bytes(self) -> int:
        """Bytes of the models currently on disk (by their records' sizes)."""
        return sum(s.size for s in self._slots.values())

    def path_for(self, record: ModelRecord) -> Path:
        """The directory a complete copy of ``record`` lives in."""
        return self.root / record.family / f"{record.version}-{content_digest(record)}"

    def __contains__(self, record: object) -> bool:
        if not isinstance(record, ModelRecord):
            return False
        return str(self.path_for(record)) in self._slots

    # -- checkout ----------------------------------------------------------------------
    @asynccontextmanager
    async def checkout(self, record: ModelRecord) -> AsyncIterator[CacheEntry]:
        """Yield the model's verified directory, downloading it first on a miss.

        While checked out the directory is pinned: eviction never removes it. Concurrent
        checkouts of one model share a single download.
        """
        await self.start()
        path = self.path_for(record)
        key = str(path)
        lock = self._locks.setdefault(key, asyncio.Lock())
        pin: int | None = None
        async with lock:
            slot = self._slots.get(key)
            if slot is not None:
                pin = await asyncio.to_thread(_pin, path)  # None: another worker evicted it
            if slot is not None and (pin is None or not (path / MARKER).exists()):
                log.warning("cached model %s vanished from disk; downloading it again", record.name)
                del self._slots[key]
                slot = None
            hit = slot is not None
            if slot is None:
                self.misses += 1
                size = sum(f.size for f in record.files)
                await self._evict(incoming=size, loading=key)
                try:
                    await self._download(record, path)
                except BaseException:
                    self.download_failures += 1
                    raise
                slot = self._slots[key] = _Slot(key=key, path=path, size=size, last_used=0, name=record.name)
                pin = await asyncio.to_thread(_pin, path)
            else:
                self.hits += 1
                self._touch(path)
            # No await between finding the slot and pinning it, so eviction cannot interleave.
            slot.pins += 1
            slot.last_used = next(self._clock)
        try:
            if not hit:
                await self._evict(incoming=0, loading=None)
            yield CacheEntry(path=path, hit=hit, size=slot.size)
        finally:
            slot.pins -= 1
            if pin is not None:
                os.close(pin)  # releases the shared lock

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path / MARKER)
        except OSError as e:
            log.debug("could not touch %s: %s", path / MARKER, e)

    def _store(self, location: ArtifactLocation) -> ArtifactStore:
        return self._stores.get(location)

    def _count(self, n: int) -> None:
        self.bytes_downloaded += n

    async def _download(self, record: ModelRecord, final: Path) -> None:
        """Fetch and verify every file into ``.partial``, then rename the directory into place."""
        tmp = self._scratch / f"{record.family}-{record.version}-{uuid.uuid4().hex[:8]}"
        store = self._store(record.artifact)
        files = [(f, _safe_relpath(f.path)) for f in record.files]
        gate = asyncio.Semaphore(_DOWNLOAD_CONCURRENCY)
        log.info("downloading %s (%d files, %d bytes) from %s://%s/%s", record.name, len(files),
                 record.total_size, record.artifact.store, record.artifact.bucket, record.artifact.prefix)

        async def one(f: ModelFile, rel: PurePosixPath) -> None:
            dest = tmp.joinpath(*rel.parts)
            async with gate:
                dest.parent.mkdir(parents=True, exist_ok=True)
                await store.get(object_name(record.artifact, f.path), dest, self._count)
                await asyncio.to_thread(_verify, dest, f)

        try:
            tmp.mkdir(parents=True)
            async with asyncio.TaskGroup() as tg:
                for f, rel in files:
                    tg.create_task(one(f, rel))
            marker = _Marker(name=record.name, digest=content_digest(record),
                             size=sum(f.size for f in record.files), files=len(files))
            stale = await asyncio.to_thread(self._commit, tmp, final, msgspec.json.encode(marker))
            if stale is not None:
                await self._remove(stale)
        except BaseException as e:
            await self._remove(tmp)
            first = e.exceptions[0] if isinstance(e, BaseExceptionGroup) else e
            if isinstance(first, ArtifactError):
                raise ArtifactError(f"{record.name}: {first.message}") from first
            if isinstance(first, OSError):
                raise ArtifactError(f"{record.name}: cannot write {tmp}: {first}") from first
            raise
        log.info("cached %s in %s", record.name, final)

    def _commit(self, tmp: Path, final: Path, marker: bytes) -> Path | None:
        """Mark ``tmp`` complete and rename it to ``final``; return a displaced stale dir, if any."""
        (tmp / MARKER).write_bytes(marker)
        final.parent.mkdir(parents=True, exist_ok=True)
        stale = None
        if (final / MARKER).exists():  # another worker sharing the cache put it in place first
            return self._discard(tmp)
        if final.exists():  # a directory without a marker: never ours to serve
            stale = self._discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).exists():
                raise
            return self._discard(tmp)  # the other worker won the race between check and rename
        return stale

    # -- eviction ----------------------------------------------------------------------
    def _discard(self, path: Path) -> Path:
        """Move ``path`` into ``.partial`` at once (so its name is free again); return the new path."""
        trash = self._scratch / f"evict-{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)
        return trash

    def _discard_unless_pinned(self, path: Path) -> Path:
        """:meth:`_discard` while holding the directory's pin exclusively; BlockingIOError
        when another process has it checked out."""
        fd = os.open(path / PIN, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self._discard(path)
        finally:
            os.close(fd)

    async def _remove(self, path: Path) -> None:
        # Shielded: if the caller is cancelled the removal still finishes in its thread.
        try:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, ignore_errors=False))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s (cleaned at next start): %s", path, e)

    async def _evict(self, *, incoming: int, loading: str | None) -> None:
        """Evict least-recently-used unpinned models until ``incoming`` more bytes fit."""
        victims: list[_Slot] = []
        usage = self.usage_bytes
        if usage + incoming > self.budget_bytes:
            for slot in sorted(self._slots.values(), key=lambda s: s.last_used):
                if usage + incoming <= self.budget_bytes:
                    break
                if slot.pins or slot.key == loading:
                    continue
                victims.append(slot)
                usage -= slot.size
        trash: list[Path] = []
        for slot in victims:
            try:
                moved = self._discard_unless_pinned(slot.path)
            except FileNotFoundError:  # another worker sharing the cache evicted it
                moved = None
            except BlockingIOError:  # another worker has it checked out: kept
                log.info("not evicting %s: another worker sharing the cache uses it", slot.name or slot.key)
                continue
            del self._slots[slot.key]
            lock = self._locks.get(slot.key)
            if lock is not None and not lock.locked():
                del self._locks[slot.key]
            if moved is not None:
                trash.append(moved)
            self.evictions += 1
            log.info("evicted %s from disk cache (%d bytes)", slot.name or slot.key, slot.size)
        if usage + incoming > self.budget_bytes:
            log.warning(
                "disk cache over budget: %d bytes in use or loading, budget %d (the rest is checked out "
                "or a single model is larger than the budget)", usage + incoming, self.budget_bytes,
            )
        for path in trash:
            await self._remove(path)
