"""Warm routing on real workers: a job goes to the worker that holds its model, and spills
to another when that one cannot take it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mnemos.client import Client, job_spec
from mnemos.messages import WorkerCommand, WorkerRecord, encode, utcnow
from mnemos.names import Names, model_token
from neuron_runtime.affinity import EVICT, ROOM, WARM, Affinity
from tests.conftest import assert_eventually

A, B = "demo-gpt2:v1", "demo-gpt2-b:v1"


@pytest.fixture
async def two_models(registry: Any, demo_model: Any, tiny_model_dir: Path) -> None:
    await registry.push(tiny_model_dir, family="demo-gpt2-b", version="v1", runtime="transformers")


def lm(model: str) -> Any:
    return job_spec(model, prompt="hello", max_tokens=2, temperature=0)


async def _holds(client: Client, worker_id: str, model: str) -> bool:
    return any(w.worker_id == worker_id and w.loaded_models == [model] for w in await client.workers())


async def _one_model_workers(start_worker: Any, client: Client) -> dict[str, str]:
    """Two workers that hold one model each, A and B (model -> worker id)."""
    first = await start_worker(runtimes=["transformers"], max_loaded_models=1)
    second = await start_worker(runtimes=["transformers"], max_loaded_models=1)
    for me, other in ((first, second), (second, first)):  # each has heard the other
        await assert_eventually(lambda m=me, o=other: o.worker_id in m.affinity.peers, timeout=10)
    a = await client.run(lm(A), timeout=60)
    b = await client.run(lm(B), timeout=60)
    assert a.status == b.status == "completed"
    holder = {A: a.worker_id, B: b.worker_id}
    assert set(holder.values()) == {first.worker_id, second.worker_id}  # B went where it evicts nothing
    for model, worker_id in holder.items():  # each knows what the other holds
        assert worker_id is not None
        await assert_eventually(lambda w=worker_id, m=model: _holds(client, w, m), timeout=10)
    return {m: w for m, w in holder.items() if w is not None}


async def test_alternating_models_go_to_the_worker_that_holds_them(
    control_plane: Any, two_models: None, start_worker: Any, client: Client
) -> None:
    holder = await _one_model_workers(start_worker, client)
    for i in range(12):
        model = (A, B)[i % 2]
        rec = await client.run(lm(model), timeout=60)
        assert rec.status == "completed" and rec.timings.cache_hit, (i, rec.worker_id, rec.timings)
        assert rec.worker_id == holder[model]


async def test_a_job_spills_to_a_cold_worker_when_the_warm_one_cannot_take_it(
    control_plane: Any, two_models: None, start_worker: Any, client: Client, nc: Any, names: Names
) -> None:
    holder = await _one_model_workers(start_worker, client)
    # The worker holding A takes nothing more (paused): A's job goes to the other worker,
    # which loads A (evicting B) rather than leave the job waiting.
    await nc.request(names.worker_control_subject(holder[A]), encode(WorkerCommand(command="pause")), timeout=5)
    rec = await client.run(lm(A), timeout=60)
    assert rec.status == "completed" and rec.worker_id == holder[B] and not rec.timings.cache_hit


def peer(worker_id: str, *, loaded: list[str], free: int) -> WorkerRecord:
    now = utcnow()
    return WorkerRecord(worker_id=worker_id, hostname="h", version="t", status="idle", runtimes=["transformers"],
                        max_concurrent_jobs=4, free_slots=free, registered_at=now, last_heartbeat=now,
                        loaded_models=loaded, max_loaded_models=1)


def test_the_rating_prefers_warm_then_room_then_eviction() -> None:
    now = [0.0]
    loaded: set[str] = {"m1"}
    aff = Affinity("me", lambda: (loaded, 1), spill_delay_s=0.02, clock=lambda: now[0])
    assert aff.cost_here("m1") == WARM and aff.cost_here("m2") == EVICT
    assert aff.defer_s("transformers", "m2") == 0.0  # no peer: take it
    aff.heard(peer("other", loaded=["m2"], free=1))
    assert aff.defer_s("transformers", "m2") == 0.02  # the peer holds it: leave it for a moment
    assert aff.defer_s("transformers", "m1") == 0.0  # ours
    aff.heard(peer("other", loaded=["m2"], free=0))
    assert aff.defer_s("transformers", "m2") == 0.0  # the peer is full
    aff.heard(peer("other", loaded=[], free=1))
    assert aff.best_peer_cost("transformers", "m3") == ROOM and aff.defer_s("transformers", "m3") == 0.02
    assert aff.defer_s("python", "m3") == 0.0  # the peer does not serve python
    aff.heard(peer("me", loaded=[], free=1))  # its own record does not count
    now[0] = 100.0  # the peer's record went stale (3 heartbeats of 5 s)
    assert aff.defer_s("transformers", "m3") == 0.0
    aff.heard(peer("dead", loaded=["m3"], free=1), age_s=60.0)  # read back from the bucket, a minute old
    assert aff.defer_s("transformers", "m3") == 0.0


async def test_an_older_releases_consumer_is_replaced_by_per_model_ones(
    control_plane: Any, demo_fn: Any, start_worker: Any, client: Client, nc: Any, names: Names
) -> None:
    """A data directory from before per-model consumers has one consumer per runtime and
    priority; its filter overlaps the new ones, so the first worker that needs them deletes
    it, and the job it held back runs."""
    from nats.js import api as jsapi

    legacy = names.legacy_dispatch_consumer("python", 5)
    await nc.jetstream().add_consumer(names.dispatch_stream, jsapi.ConsumerConfig(
        durable_name=legacy, filter_subject=names.dispatch_filter("python", 5),
        ack_policy=jsapi.AckPolicy.EXPLICIT))
    queued = await client.submit(job_spec("demo-fn:v1", function="noop"))
    await start_worker(runtimes=["python"])
    assert (await client.wait(queued.job_id, timeout=30)).status == "completed"
    consumers = {c.name for c in await nc.jetstream().consumers_info(names.dispatch_stream)}
    assert legacy not in consumers
    assert names.dispatch_consumer("python", 5, model_token("demo-fn", "v1")) in consumers
