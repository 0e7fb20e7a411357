"""The model registry against a real nats-server (KV + object store) and a real S3 API (moto)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import boto3
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError
from pydantic import ValidationError

from mnemos.errors import ArtifactError, Conflict, ModelNotFound, UnknownRuntime, ValidationFailed
from mnemos.layout import Layout
from mnemos.messages import ModelRecord, decode
from mnemos.names import Names
from neuron_runtime.cache import DiskCache
from registry import (
    ModelDeleted,
    NatsArtifactStore,
    Registry,
    RegistrySettings,
    object_name,
    open_store,
    scan_directory,
)

PY_CONFIG = {"entrypoint": "functions.py:echo"}


def make_model_dir(root: Path, seed: str = "a", *, extra: dict[str, bytes] | None = None) -> Path:
    """A small model directory: nested files, plus hidden and temp files that must be skipped."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": json.dumps({"seed": seed}).encode(),
        "weights/model.bin": (seed.encode() * 3000)[:3000],
        "tokenizer/vocab.txt": f"hello\nworld\n{seed}\n".encode(),
        "empty.txt": b"",
        "tokenizer/special tokens.json": b'{"eos": "<|end|>"}',
        **(extra or {}),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / ".git").mkdir(exist_ok=True)
    (root / ".git" / "HEAD").write_text("ref: main")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "weights" / "model.bin.tmp").write_bytes(b"half written")
    return root


def test_scan_directory_hashes_regular_files_and_skips_hidden_and_temp(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    files = scan_directory(model)
    assert [f.path for f in files] == [
        "config.json", "empty.txt", "tokenizer/special tokens.json", "tokenizer/vocab.txt", "weights/model.bin"
    ]
    for f in files:
        data = (model / f.path).read_bytes()
        assert f.size == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValidationFailed):
        scan_directory(tmp_path / "missing")
    (tmp_path / "only-hidden").mkdir()
    (tmp_path / "only-hidden" / ".hidden").write_text("x")
    with pytest.raises(ValidationFailed, match="no model files"):
        scan_directory(tmp_path / "only-hidden")


async def test_push_get_list_and_alias(registry: Registry, names: Names, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    moved: dict[str, int] = defaultdict(int)
    sizes: dict[str, int] = {}

    def progress(path: str, n: int, size: int) -> None:
        moved[path] += n
        sizes[path] = size

    assert await registry.list() == []
    record = await registry.push(
        model, family="echo", version="1.0", runtime="python", runtime_config=PY_CONFIG,
        aliases=["echo-latest"], description="demo", progress=progress,
    )
    assert record.name == "echo:1.0"
    assert record.artifact.store == "nats"
    assert record.artifact.bucket == names.artifacts_bucket
    assert record.artifact.prefix == "echo/1.0"
    assert record.total_size == sum(f.size for f in record.files) == sum(f.size for f in scan_directory(model))
    assert dict(moved) == {f.path: f.size for f in record.files if f.size}
    assert all(sizes[p] == moved[p] for p in moved)

    assert await registry.get("echo:1.0") == record
    assert await registry.get("echo-latest") == record
    assert await registry.list() == [record]
    for missing in ("echo:2.0", "nope", "bad name:1", ""):
        with pytest.raises(ModelNotFound):
            await registry.get(missing)


async def test_record_is_readable_json_in_kv(registry: Registry, layout: Layout, tmp_path: Path) -> None:
    record = await registry.push(
        make_model_dir(tmp_path / "m"), family="echo", version="1.0.1", runtime="python", runtime_config=PY_CONFIG
    )
    entry = await layout.models.get("echo.1.0.1")
    assert entry.value is not None
    doc = json.loads(entry.value)
    assert doc["type"] == "io.mnemos.v1.model"
    assert doc["family"] == "echo" and doc["version"] == "1.0.1" and doc["runtime"] == "python"
    assert doc["runtime_config"] == PY_CONFIG
    assert {f["path"] for f in doc["files"]} == {f.path for f in record.files}
    assert decode(entry.value, ModelRecord) == record


async def test_objects_are_named_family_version_path(
    registry: Registry, nc: NATS, names: Names, tmp_path: Path
) -> None:
    model = make_model_dir(tmp_path / "m")
    record = await registry.push(model, family="gpt", version="2", runtime="transformers")
    obs = await nc.jetstream().object_store(names.artifacts_bucket)
    stored = {info.name for info in await obs.list(ignore_deletes=True)}
    assert stored == {f"gpt/2/{f.path}" for f in record.files}

    store = NatsArtifactStore(nc.jetstream(), names.artifacts_bucket)
    out = tmp_path / "out.bin"
    await store.get(object_name(record.artifact, "weights/model.bin"), out)
    assert out.read_bytes() == (model / "weights/model.bin").read_bytes()


async def test_conflict_then_force_replaces_and_drops_stale_objects(
    registry: Registry, nc: NATS, names: Names, tmp_path: Path
) -> None:
    first = await registry.push(
        make_model_dir(tmp_path / "a", "a", extra={"old.bin": b"old"}), family="echo", version="1",
        runtime="python", runtime_config=PY_CONFIG,
    )
    with pytest.raises(Conflict, match="already exists"):
        await registry.push(make_model_dir(tmp_path / "b", "b"), family="echo", version="1", runtime="python",
                            runtime_config=PY_CONFIG)
    assert await registry.get("echo:1") == first

    second = await registry.push(make_model_dir(tmp_path / "b", "b"), family="echo", version="1",
                                 runtime="python", runtime_config=PY_CONFIG, force=True)
    assert second != first
    assert await registry.get("echo:1") == second
    obs = await nc.jetstream().object_store(names.artifacts_bucket)
    stored = {info.name for info in await obs.list(ignore_deletes=True)}
    assert stored == {f"echo/1/{f.path}" for f in second.files}
    assert "echo/1/old.bin" not in stored


async def test_aliases_are_unique_and_never_shadow_models(registry: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    await registry.push(model, family="a", version="1", runtime="python", runtime_config=PY_CONFIG,
                        aliases=["stable"])
    with pytest.raises(Conflict, match="stable"):
        await registry.push(model, family="b", version="1", runtime="python", runtime_config=PY_CONFIG,
                            aliases=["stable"])
    for alias, why in (("a:1", "looks like"), ("c:2", "looks like"), ("x x", "whitespace"), ("", "1-160")):
        with pytest.raises(ValidationFailed, match=why):
            await registry.push(model, family="b", version="1", runtime="python", runtime_config=PY_CONFIG,
                                aliases=[alias])
    with pytest.raises(ValidationFailed, match="twice"):
        await registry.push(model, family="b", version="1", runtime="python", runtime_config=PY_CONFIG,
                            aliases=["x", "x"])
    # Re-pushing a model with force may keep its own aliases.
    await registry.push(model, family="a", version="1", runtime="python", runtime_config=PY_CONFIG,
                        aliases=["stable", "prod"], force=True)
    assert (await registry.get("prod")).name == "a:1"
    assert [r.name for r in await registry.list()] == ["a:1"]


async def test_invalid_pushes_are_rejected_before_uploading(
    registry: Registry, nc: NATS, names: Names, tmp_path: Path
) -> None:
    model = make_model_dir(tmp_path / "m")
    with pytest.raises(ValidationFailed, match="family"):
        await registry.push(model, family="bad.family", version="1", runtime="pytorch")
    with pytest.raises(ValidationFailed, match="version"):
        await registry.push(model, family="ok", version="1_0", runtime="pytorch")
    with pytest.raises(ValidationFailed, match="runtime_config"):
        await registry.push(model, family="ok", version="1", runtime="pytorch", runtime_config={"nope": 1})
    with pytest.raises(ValidationFailed, match="runtime_config"):
        await registry.push(model, family="ok", version="1", runtime="python")  # entrypoint required
    with pytest.raises(UnknownRuntime):
        await registry.push(model, family="ok", version="1", runtime="onnx")
    with pytest.raises(ValidationFailed):
        await registry.push(model, family="ok", version="1", runtime="pytorch", store="ftp")
    with pytest.raises(ValidationFailed, match="does not exist"):
        await registry.push(tmp_path / "missing", family="ok", version="1", runtime="pytorch")
    assert await registry.list() == []
    with pytest.raises(BucketNotFoundError):
        await nc.jetstream().object_store(names.artifacts_bucket)


async def test_delete_purges_artifacts_and_allows_repush(
    registry: Registry, nc: NATS, names: Names, tmp_path: Path
) -> None:
    model = make_model_dir(tmp_path / "m")
    await registry.push(model, family="tmp", version="1", runtime="pytorch", aliases=["gone"])
    await registry.push(model, family="keep", version="1", runtime="pytorch")
    deleted = await registry.delete("gone")
    assert deleted.name == "tmp:1"
    with pytest.raises(ModelNotFound):
        await registry.get("tmp:1")
    with pytest.raises(ModelNotFound):
        await registry.delete("tmp:1")
    obs = await nc.jetstream().object_store(names.artifacts_bucket)
    stored = {info.name for info in await obs.list(ignore_deletes=True)}
    assert stored and all(name.startswith("keep/1/") for name in stored)

    again = await registry.push(model, family="tmp", version="1", runtime="pytorch")
    assert await registry.get("tmp:1") == again
    await registry.delete("keep:1", purge_artifacts=False)
    stored = {info.name for info in await obs.list(ignore_deletes=True)}
    assert any(name.startswith("keep/1/") for name in stored)


async def test_watch_reports_pushes_and_deletes(registry: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    await registry.push(model, family="w", version="1", runtime="pytorch")
    events: list[ModelRecord | ModelDeleted] = []

    async def consume() -> None:
        async with contextlib.aclosing(registry.watch()) as stream:
            async for event in stream:
                events.append(event)
                if isinstance(event, ModelDeleted):
                    return

    task = asyncio.create_task(consume())
    await registry.push(model, family="w", version="2", runtime="pytorch")
    await registry.delete("w:1")
    await asyncio.wait_for(task, timeout=5)
    assert [e.name if isinstance(e, ModelRecord) else e.key for e in events][:2] == ["w:1", "w:2"]
    assert events[-1] == ModelDeleted(key="w.1")


async def test_start_creates_a_missing_models_bucket(
    nc: NATS, names: Names, layout: Layout, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await js.delete_key_value(names.models_bucket)
    async with Registry(js, names, RegistrySettings()) as registry:
        assert await registry.list() == []
        record = await registry.push(make_model_dir(tmp_path / "m"), family="f", version="1", runtime="pytorch")
    kv = await js.key_value(names.models_bucket)
    assert (await kv.get("f.1")).value is not None
    assert record.name == "f:1"


def test_settings_require_a_bucket_for_s3() -> None:
    with pytest.raises(ValidationError, match="s3_bucket"):
        RegistrySettings(artifact_store="s3")
    with pytest.raises(ValidationError, match="both"):
        RegistrySettings(s3_access_key_id="only-id")
    s = RegistrySettings(artifact_store="s3", s3_bucket="b", s3_prefix="/models/")
    assert s.s3_prefix == "models"
    assert "secret" not in repr(RegistrySettings(s3_access_key_id="id", s3_secret_access_key="secret"))


async def test_s3_push_and_cache_download(
    nc: NATS, names: Names, layout: Layout, moto_server: str, tmp_path: Path
) -> None:
    bucket = f"{names.prefix}-models"
    settings = RegistrySettings(
        artifact_store="nats", s3_bucket=bucket, s3_endpoint_url=moto_server, s3_access_key_id="test",
        s3_secret_access_key="test", s3_prefix="models",
    )
    model = make_model_dir(tmp_path / "m")
    moved: dict[str, int] = defaultdict(int)
    async with Registry(nc.jetstream(), names, settings) as registry:
        record = await registry.push(
            model, family="s3model", version="1", runtime="pytorch", store="s3",
            progress=lambda path, n, size: moved.__setitem__(path, moved[path] + n),
        )
    assert (record.artifact.store, record.artifact.bucket, record.artifact.prefix) == ("s3", bucket, "models/s3model/1")
    assert dict(moved) == {f.path: f.size for f in record.files if f.size}

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="models/")
    assert {o["Key"] for o in listing["Contents"]} == {f"models/s3model/1/{f.path}" for f in record.files}

    js = nc.jetstream()
    cache = DiskCache(tmp_path / "cache", 10**6, lambda loc: open_store(loc, js, settings))
    async with cache, cache.checkout(record) as entry:
        assert not entry.hit
        for f in record.files:
            assert (entry.path / f.path).read_bytes() == (model / f.path).read_bytes()
    assert cache.bytes_downloaded == record.total_size

    async with Registry(js, names, settings) as registry:
        await registry.delete("s3model:1")
    assert s3.list_objects_v2(Bucket=bucket, Prefix="models/")["KeyCount"] == 0


async def test_failed_upload_registers_nothing(nc: NATS, names: Names, layout: Layout, tmp_path: Path) -> None:
    settings = RegistrySettings(artifact_store="s3", s3_bucket="unreachable", s3_endpoint_url="http://127.0.0.1:9",
                                s3_access_key_id="x", s3_secret_access_key="y")
    async with Registry(nc.jetstream(), names, settings) as registry:
        with pytest.raises(ArtifactError, match="unreachable"):
            await registry.push(make_model_dir(tmp_path / "m"), family="f", version="1", runtime="pytorch")
        assert await registry.list() == []
