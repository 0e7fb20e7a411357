"""``Client.stream()`` and ``Client.wait()`` follow a job to its real end: across a NATS
restart (every chunk once, in order, then the final message), and across a retry (the
final message of an earlier attempt does not end them).

This module runs on its own nats-server (own port, own JetStream store) so it can stop and
restart it without disturbing the session's shared server: the module-level ``nats_server``
fixture overrides the session one, and every platform fixture of conftest follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.embedded import EmbeddedNats, free_port
from mnemos.messages import ResultChunk, ResultFinal, ResultMessage
from tests.conftest import assert_eventually

# A streaming function that stops at a gate (a file the test creates): the server can then
# be restarted while the stream is open but no chunk is on its way. (A chunk published by
# the worker during the outage can be lost: chunks are core publishes without an ack.)
_GATED = '''
import asyncio
import os
import time


async def gated(gate: str, before: int, after: int):
    for i in range(before):
        yield i
    deadline = time.monotonic() + 60
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        await asyncio.sleep(0.01)
    for i in range(before, before + after):
        yield i
'''


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test alone, on a fixed free port with its own store."""
    store = tmp_path / "jetstream"
    server = EmbeddedNats(store_dir=store, port=free_port(), log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


async def test_stream_resumes_after_nats_restart(
    nats_server: EmbeddedNats,
    nats_settings: NatsSettings,
    control_plane: Any,
    registry: Any,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "gated"
    model_dir.mkdir()
    (model_dir / "functions.py").write_text(_GATED)
    await registry.push(model_dir, family="gated", version="v1", runtime="python",
                        runtime_config={"entrypoint": "functions.py:gated"})
    await start_worker()
    gate = tmp_path / "gate"
    before, after = 10, 50

    async with await Client.connect(nats_settings) as client:
        job = await client.submit(job_spec("gated:v1", args=[str(gate), before, after]))
        items: list[ResultMessage] = []

        async def follow() -> None:
            async for item in client.stream(job.job_id):
                items.append(item)

        follower = asyncio.create_task(follow())
        await assert_eventually(lambda: sum(isinstance(i, ResultChunk) for i in items) == before,
                                message="the first chunks arrived")

        # The server goes away and comes back on the same port and store while the
        # iterator waits: its consumer is gone with the old server process.
        restarted_at = datetime.now(UTC)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)

        async def worker_back() -> bool:  # a heartbeat stored after the restart
            try:
                return any(w.last_heartbeat > restarted_at for w in await client.workers())
            except Exception:  # noqa: BLE001 - the control plane may still be reconnecting
                return False

        await assert_eventually(worker_back, timeout=15, message="the worker reconnected")
        gate.touch()  # the rest of the job streams now, and the job ends
        await asyncio.wait_for(follower, 15)
        assert client.nc.stats["reconnects"] >= 1

    chunks = [i for i in items if isinstance(i, ResultChunk)]
    finals = [i for i in items if isinstance(i, ResultFinal)]
    assert [c.seq for c in chunks] == list(range(before + after))  # every chunk once, in order
    assert [c.data for c in chunks] == list(range(before + after))
    assert len(finals) == 1 and items[-1] is finals[0]
    assert finals[0].status == "completed" and finals[0].output is not None
    assert finals[0].output.result == list(range(before + after))


async def test_wait_and_stream_follow_a_retried_job_to_its_new_end(
    nats_settings: NatsSettings, control_plane: Any, demo_fn: Any, start_worker: Any
) -> None:
    first = await start_worker(runtimes=["python"])
    async with await Client.connect(nats_settings) as client:
        failed = await client.run(job_spec("demo-fn:v1", function="fail", args=["once"]))
        assert failed.status == "failed" and failed.attempt == 1
        await first.drain()  # no worker: the retried job stays queued
        assert (await client.retry(failed.job_id)).status == "queued"

        # The result stream still ends with attempt 1's final message; neither may stop there.
        waiting = asyncio.create_task(client.wait(failed.job_id, timeout=60))
        streamed: list[ResultMessage] = []

        async def follow() -> None:
            async for item in client.stream(failed.job_id):
                streamed.append(item)

        following = asyncio.create_task(follow())
        await assert_eventually(lambda: any(isinstance(i, ResultFinal) for i in streamed),
                                message="attempt 1's final message replayed")
        assert not waiting.done() and not following.done()

        await start_worker(runtimes=["python"])
        done = await asyncio.wait_for(waiting, 30)
        await asyncio.wait_for(following, 30)
    assert done.status == "failed" and done.attempt == 2
    finals = [(i.attempt, i.status) for i in streamed if isinstance(i, ResultFinal)]
    assert finals == [(1, "failed"), (2, "failed")]
