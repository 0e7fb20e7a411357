"""The worker's disk cache against models pushed to a real NATS object store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from mnemos.errors import ArtifactError
from mnemos.messages import ArtifactLocation, ModelRecord
from mnemos.names import Names
from neuron_runtime.cache import MARKER, DiskCache, content_digest
from registry import ArtifactStore, NatsArtifactStore, Registry, RegistrySettings, object_name, open_store

SIZE = 1000  # bytes per test model


def write_model(root: Path, seed: str) -> Path:
    """A model of exactly SIZE bytes in four files (one nested, one empty)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_bytes(f'{{"seed": "{seed}"}}'.encode().ljust(100))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "model.bin").write_bytes((seed.encode() * SIZE)[:850])
    (root / "vocab.txt").write_bytes(b"v" * 50)
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def stores(nc: NATS) -> Callable[[ArtifactLocation], ArtifactStore]:
    js = nc.jetstream()
    settings = RegistrySettings()
    return lambda loc: open_store(loc, js, settings)


async def push(registry: Registry, tmp_path: Path, family: str, seed: str | None = None) -> ModelRecord:
    model = write_model(tmp_path / "src" / family, seed or family)
    return await registry.push(model, family=family, version="1", runtime="pytorch")


def same_files(record: ModelRecord, path: Path, src: Path) -> bool:
    return all((path / f.path).read_bytes() == (src / f.path).read_bytes() for f in record.files)


def partial_contents(root: Path) -> list[Path]:
    """What ``.partial`` holds besides the (empty) scratch directories of live caches."""
    out: list[Path] = []
    for entry in (root / ".partial").iterdir():
        is_scratch = entry.is_dir() and entry.name.split("-", 1)[0].isdigit()
        out.extend(entry.iterdir() if is_scratch else [entry])
    return out


async def test_miss_then_hit(registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore],
                             tmp_path: Path) -> None:
    record = await push(registry, tmp_path, "alpha")
    async with DiskCache(tmp_path / "cache", 10_000, stores) as cache:
        async with cache.checkout(record) as entry:
            assert not entry.hit
            assert entry.size == SIZE == record.total_size
            assert entry.path == tmp_path / "cache" / "alpha" / f"1-{content_digest(record)}"
            assert (entry.path / MARKER).exists()
            assert same_files(record, entry.path, tmp_path / "src" / "alpha")
        async with cache.checkout(record) as again:
            assert again.hit and again.path == entry.path
        assert (cache.hits, cache.misses, cache.bytes_downloaded) == (1, 1, SIZE)
        assert record in cache
        assert partial_contents(cache.root) == []


async def test_corrupt_artifact_is_detected_and_never_served(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], nc: NATS, names: Names,
    tmp_path: Path,
) -> None:
    record = await push(registry, tmp_path, "beta")
    store = NatsArtifactStore(nc.jetstream(), names.artifacts_bucket)
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(b"X" * 850)  # same size, other bytes: only the sha256 can tell
    await store.put(object_name(record.artifact, "weights/model.bin"), tampered)

    cache = DiskCache(tmp_path / "cache", 10_000, stores)
    with pytest.raises(ArtifactError, match="sha256"):
        async with cache.checkout(record):
            pytest.fail("a corrupt model was served")
    assert not cache.path_for(record).exists()
    assert partial_contents(cache.root) == []
    assert record not in cache

    tampered.write_bytes(b"short")
    await store.put(object_name(record.artifact, "weights/model.bin"), tampered)
    with pytest.raises(ArtifactError, match="5 bytes"):
        async with cache.checkout(record):
            pytest.fail("a truncated model was served")

    await store.delete(object_name(record.artifact, "vocab.txt"))
    with pytest.raises(ArtifactError, match="not found"):
        async with cache.checkout(record):
            pytest.fail("an incomplete model was served")
    assert not cache.path_for(record).exists()
    assert partial_contents(cache.root) == []
    assert (cache.misses, cache.download_failures, cache.hits) == (3, 3, 0)


async def test_concurrent_checkouts_download_once(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    record = await push(registry, tmp_path, "gamma")
    cache = DiskCache(tmp_path / "cache", 10_000, stores)

    async def use() -> bool:
        async with cache.checkout(record) as entry:
            assert same_files(record, entry.path, tmp_path / "src" / "gamma")
            return entry.hit

    hits = await asyncio.gather(*(use() for _ in range(6)))
    assert sorted(hits) == [False] + [True] * 5
    assert (cache.misses, cache.hits, cache.bytes_downloaded) == (1, 5, SIZE)


async def test_lru_eviction_keeps_usage_within_budget(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    a, b, c = [await push(registry, tmp_path, f) for f in ("ma", "mb", "mc")]
    cache = DiskCache(tmp_path / "cache", 2 * SIZE + SIZE // 2, stores)
    for record in (a, b, a):  # a is now the most recently checked out
        async with cache.checkout(record):
            pass
    async with cache.checkout(c) as entry:
        assert not entry.hit
    assert cache.path_for(a).exists() and cache.path_for(c).exists()
    assert not cache.path_for(b).exists()
    assert b not in cache
    assert cache.usage_bytes == 2 * SIZE <= cache.budget_bytes
    assert cache.evictions == 1
    async with cache.checkout(b) as entry:  # evicted models download again
        assert not entry.hit
    assert not cache.path_for(a).exists()


async def test_checked_out_models_are_never_evicted(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = [await push(registry, tmp_path, f) for f in ("pa", "pb", "pc")]
    cache = DiskCache(tmp_path / "cache", SIZE + SIZE // 2, stores)
    with caplog.at_level(logging.WARNING, logger="mnemos.cache"):
        async with cache.checkout(a) as ea, cache.checkout(b) as eb:
            # Over budget, but a is in use: both stay and both are complete.
            assert same_files(a, ea.path, tmp_path / "src" / "pa")
            assert same_files(b, eb.path, tmp_path / "src" / "pb")
            assert cache.evictions == 0
    assert "over budget" in caplog.text
    async with cache.checkout(c):
        pass
    assert not cache.path_for(a).exists() and not cache.path_for(b).exists()
    assert cache.usage_bytes == SIZE


async def test_model_bigger_than_budget_still_loads(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = await push(registry, tmp_path, "huge")
    cache = DiskCache(tmp_path / "cache", SIZE // 10, stores)
    with caplog.at_level(logging.WARNING, logger="mnemos.cache"):
        async with cache.checkout(record) as entry:
            assert same_files(record, entry.path, tmp_path / "src" / "huge")
    assert "over budget" in caplog.text


async def test_restart_reuses_complete_directories_and_cleans_partial(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    record = await push(registry, tmp_path, "delta")
    root = tmp_path / "cache"
    async with DiskCache(root, 10_000, stores) as first, first.checkout(record):
        pass
    # A crash mid-download leaves garbage in .partial only.
    junk = root / ".partial" / "delta-1-dead"
    (junk / "weights").mkdir(parents=True)
    (junk / "weights" / "model.bin").write_bytes(b"half")

    def no_store(loc: ArtifactLocation) -> ArtifactStore:
        raise AssertionError("a restarted cache must not download a complete model again")

    async with DiskCache(root, 10_000, no_store) as second:
        assert not junk.exists() and partial_contents(root) == []
        assert record in second and second.usage_bytes == SIZE
        async with second.checkout(record) as entry:
            assert entry.hit
            assert same_files(record, entry.path, tmp_path / "src" / "delta")
        assert second.bytes_downloaded == 0


async def test_restart_evicts_down_to_a_smaller_budget(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    a, b = [await push(registry, tmp_path, f) for f in ("ra", "rb")]
    root = tmp_path / "cache"
    async with DiskCache(root, 10_000, stores) as first:
        for record in (a, b):
            async with first.checkout(record):
                pass
    async with DiskCache(root, SIZE, stores) as second:
        assert second.usage_bytes <= SIZE
        assert len(list(root.glob("r?/*"))) == 1


async def test_unsafe_paths_in_a_record_are_refused(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    record = await push(registry, tmp_path, "evil")
    bad_file = msgspec.structs.replace(record.files[0], path="../../escape.txt")
    bad = msgspec.structs.replace(record, files=[bad_file])
    cache = DiskCache(tmp_path / "cache", 10_000, stores)
    with pytest.raises(ArtifactError, match="unsafe"):
        async with cache.checkout(bad):
            pytest.fail("served a record with an unsafe path")
    assert not (tmp_path / "escape.txt").exists()


async def test_workers_sharing_a_cache_directory_do_not_break_each_other(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    """Local workers of one machine share the cache (``mnemos up``): a worker starting while
    another downloads leaves that download alone, and two downloading the same model at
    once both get it (one copy stays)."""
    record = await push(registry, tmp_path, "shared")
    root = tmp_path / "cache"
    async with DiskCache(root, 10_000, stores) as first, DiskCache(root, 10_000, stores) as second:
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(_checkout_path(first, record))
            b = tg.create_task(_checkout_path(second, record))
            # A third worker starting meanwhile cleans only what dead processes left.
            third = DiskCache(root, 10_000, stores)
            tg.create_task(third.start())
        assert a.result() == b.result() == root / "shared" / f"1-{content_digest(record)}"
        assert same_files(record, a.result(), tmp_path / "src" / "shared")
        await third.stop()
    assert partial_contents(root) == []


async def _checkout_path(cache: DiskCache, record: ModelRecord) -> Path:
    async with cache.checkout(record) as entry:
        assert (entry.path / MARKER).exists()
        return entry.path


async def test_a_worker_never_evicts_a_model_another_worker_has_checked_out(
    registry: Registry, stores: Callable[[ArtifactLocation], ArtifactStore], tmp_path: Path
) -> None:
    """Two workers share the cache directory, each with room for one model. While the first
    has ``a`` checked out, the second's download of ``b`` does not evict ``a`` (it goes over
    budget and says so instead); once ``a`` is released it can go."""
    a = await push(registry, tmp_path, "pinned-a")
    b = await push(registry, tmp_path, "pinned-b")
    root = tmp_path / "cache"
    async with DiskCache(root, SIZE, stores) as first, DiskCache(root, SIZE, stores) as second:
        async with first.checkout(a) as held:
            async with second.checkout(a) as shared:  # the second worker indexes it too
                assert shared.hit is False and shared.path == held.path
            async with second.checkout(b):
                assert (held.path / MARKER).exists(), "evicted while another worker had it checked out"
                assert same_files(a, held.path, tmp_path / "src" / "pinned-a")
        c = await push(registry, tmp_path, "pinned-c")
        async with second.checkout(c):  # no one holds a now: it may go
            pass
        assert second.evictions >= 1 and not held.path.exists()
