"""Actors on a real stack: one activation per key under a race, calls in order, state
that survives the SIGKILL of its host worker, idle deactivation, the operator's view."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx

from mnemos.client import Client
from mnemos.errors import ExecutionError, UnknownFunction
from tests.conftest import assert_eventually


async def test_one_activation_under_a_race_of_20_clients(app_stack: Any, nats_settings: Any, client: Client,
                                                         start_worker: Any) -> None:
    await app_stack(workers=3)
    clients = [await Client.connect(nats_settings) for _ in range(20)]
    try:
        results = await asyncio.gather(*(c.call_actor("calc", "Counter", "raced", "incr", [1], {}) for c in clients))
    finally:
        for c in clients:
            await c.close()
    # One instance took every call, one at a time: each saw the count the one before left.
    assert sorted(results) == list(range(1, 21))
    actors = await client.actors()
    assert [(a.activation.cls, a.activation.key) for a in actors] == [("Counter", "raced")]


async def test_calls_run_one_at_a_time_in_arrival_order(app_stack: Any) -> None:
    calc = await app_stack()
    actor = calc.Counter.get("ordered")
    assert await actor.incr.remote.aio(0) == 0  # active: the calls below go straight to it
    # Sent in this order on one connection, so they arrive in this order.
    counts = await asyncio.gather(*(actor.append.remote.aio(i) for i in range(50)))
    assert counts == list(range(1, 51))
    assert await actor.log.remote.aio() == list(range(50))
    other = calc.Counter.get("another")
    assert await other.incr.remote.aio(3) == 3 and await actor.incr.remote.aio(0) == 0  # keys apart
    assert await asyncio.to_thread(actor.incr.remote, 2) == 2  # the blocking form


async def test_errors_reach_the_caller_and_the_actor_goes_on(app_stack: Any, client: Client) -> None:
    calc = await app_stack()
    actor = calc.Counter.get("errors")
    assert await actor.incr.remote.aio(1) == 1
    try:
        await actor.incr.remote.aio("x")
    except ExecutionError as e:
        assert e.details["exception_type"] == "TypeError"
    else:
        raise AssertionError("a TypeError in the method must reach the caller")
    try:
        await client.call_actor("calc", "Counter", "errors", "nope", [], {})
    except UnknownFunction:
        pass
    else:
        raise AssertionError("an unknown method is unknown_function")
    assert await actor.incr.remote.aio(1) == 2


async def test_state_survives_the_sigkill_of_its_host_worker(
        app_stack: Any, worker_process: Any, client: Client) -> None:
    calc = await app_stack(workers=0)
    first = worker_process("actor-host-a")
    await assert_eventually(lambda: _workers(client, 1), timeout=60, message="first worker up")
    actor = calc.Counter.get("durable")
    for _ in range(5):
        await actor.incr.remote.aio(1)
    async def checkpointed() -> bool:
        return any(a.calls == 5 for a in await client.actors())
    await assert_eventually(checkpointed, timeout=30, message="the fifth call checkpointed")
    pid = await actor.where.remote.aio()
    second = worker_process("actor-host-b")
    await assert_eventually(lambda: _workers(client, 2), timeout=60, message="second worker up")

    napping = asyncio.ensure_future(actor.nap.remote.aio(2.0))  # in flight when its host dies
    await asyncio.sleep(0.3)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its app process, with no goodbye
    first.wait()
    # The call in flight finds its holder gone (a ping nobody answers) and runs again on an
    # activation on the other worker, from the last checkpoint; so do the calls after it.
    assert await napping == 6
    assert await actor.incr.remote.aio(1) == 7
    assert await actor.where.remote.aio() != pid
    hosts = [a.activation.worker_id for a in await client.actors()]
    assert hosts == ["actor-host-b"]
    assert second.poll() is None


async def _workers(client: Client, n: int) -> bool:
    return len([w for w in await client.workers() if w.status in ("idle", "busy")]) == n


async def test_idle_actors_deactivate_and_come_back_with_their_state(
        app_stack: Any, client: Client, start_gateway: Any) -> None:
    calc = await app_stack()
    brief = calc.Brief.get("b")
    assert await brief.incr.remote.aio() == 1
    assert await brief.incr.remote.aio() == 2
    base = await start_gateway()
    async with httpx.AsyncClient(base_url=base) as http:
        shown = (await http.get("/v1/actors")).json()
    assert [a["activation"]["key"] for a in shown["actors"]] == ["b"]

    async def gone() -> bool:
        return not await client.actors()
    await assert_eventually(gone, timeout=30, message="the idle actor deactivated")
    assert await brief.incr.remote.aio() == 3  # activated again, from its checkpoint


async def test_checkpoint_interval_spaces_the_writes(app_stack: Any, client: Client) -> None:
    calc = await app_stack()
    lazy = calc.Lazy.get("l")
    assert [await lazy.incr.remote.aio() for _ in range(3)] == [1, 2, 3]
    counter = calc.Counter.get("eager")
    await counter.incr.remote.aio()

    async def eager_written() -> bool:
        return any(a.activation.cls == "Counter" and a.calls == 1 for a in await client.actors())
    await assert_eventually(eager_written, timeout=30, message="the default actor checkpointed its call")
    # The lazy one wrote its state when it was activated, and not again for 120 s.
    assert [a.calls for a in await client.actors() if a.activation.cls == "Lazy"] == [0]
