"""The `mnemos` CLI's exit codes, as scripts rely on them, against the real platform fixtures.

Commands run in-process with click's CliRunner, in a thread: each one runs its own event
loop (``asyncio.run``) while the control plane and worker under test run on pytest's.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import nats
from click.testing import CliRunner, Result

from launchers.cli import EXIT_BY_CODE, EXIT_OTHER, cli
from mnemos.config import NatsSettings
from mnemos.errors import ERROR_CLASSES
from tests.conftest import assert_eventually

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


async def _mnemos(settings: NatsSettings, *args: str) -> Result:
    argv = ["--nats-url", settings.nats_url, "--namespace", settings.namespace, *args]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, catch_exceptions=False)


async def test_not_found_exits_3(nats_settings, control_plane) -> None:
    got = await _mnemos(nats_settings, "jobs", "get", "01NOSUCHJOB")
    assert got.exit_code == 3, got.output
    assert "job_not_found" in got.stderr and got.stdout == ""
    watched = await _mnemos(nats_settings, "jobs", "ls", "--model", "nosuch:v1")
    assert watched.exit_code == 3 and "model_not_found" in watched.stderr


async def test_failed_job_exits_1(nats_settings, control_plane, demo_fn, start_worker) -> None:
    await start_worker()
    failed = await _mnemos(nats_settings, "-o", "json", "submit", "-m", "demo-fn:v1", "--function", "fail",
                           "--arg", "no luck", "--wait")
    assert failed.exit_code == 1, failed.output
    record = json.loads(failed.stdout)
    assert record["status"] == "failed" and record["error"]["code"] == "execution_error"
    watched = await _mnemos(nats_settings, "jobs", "watch", record["job_id"])
    assert watched.exit_code == 1 and "no luck" in watched.stdout
    streamed = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--function", "fail", "--stream")
    assert streamed.exit_code == 1 and "execution_error" in streamed.stderr
    # ... and a job that completes exits 0, with no spinner output when stderr is no terminal.
    ok = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--function", "add", "--arg", "2", "--arg", "3",
                       "--wait")
    assert ok.exit_code == 0 and "completed" in ok.stdout and ok.stderr == ""


async def test_invalid_requests_exit_4(nats_settings, control_plane, demo_fn) -> None:
    local = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--prompt", "x", "--temperature", "7")
    assert local.exit_code == 4 and "validation_error" in local.stderr  # refused before sending
    remote = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--runtime", "vllm", "--prompt", "x")
    assert remote.exit_code == 4 and "validation_error" in remote.stderr  # refused by the control plane
    unknown = await _mnemos(nats_settings, "submit", "-m", "nosuch:v1", "--prompt", "x")
    assert unknown.exit_code == 4 and "unknown_model" in unknown.stderr
    bad_status = await _mnemos(nats_settings, "jobs", "ls", "--status", "sleeping")
    assert bad_status.exit_code == 4 and "validation_error" in bad_status.stderr
    config = await asyncio.to_thread(CliRunner().invoke, cli, ["--namespace", "Bad!", "jobs", "ls"])
    assert config.exit_code == 4 and "invalid configuration" in config.stderr


async def test_usage_errors_exit_2(nats_settings) -> None:
    for argv in (["submit"], ["submit", "-m", "demo-fn:v1", "--priority", "11"], ["jobs", "get"],
                 ["submit", "-m", "demo-fn:v1", "--kwarg", "novalue"], ["jobs", "ls", "-o", "json"]):
        result = await _mnemos(nats_settings, *argv)
        assert result.exit_code == 2, (argv, result.output)


async def test_wrong_state_exits_6(nats_settings, control_plane, demo_fn, start_worker) -> None:
    await start_worker()
    done = json.loads((await _mnemos(nats_settings, "-o", "json", "submit", "-m", "demo-fn:v1", "--function",
                                     "noop", "--wait")).stdout)
    retried = await _mnemos(nats_settings, "jobs", "retry", done["job_id"])
    assert retried.exit_code == 6 and "invalid_state" in retried.stderr
    cancelled = await _mnemos(nats_settings, "jobs", "cancel", done["job_id"])
    assert cancelled.exit_code == 6 and "not_cancellable" in cancelled.stderr


async def test_unavailable_exits_5(nats_settings, layout) -> None:
    # NATS answers, but no control plane serves this namespace.
    no_cp = await _mnemos(nats_settings, "jobs", "ls")
    assert no_cp.exit_code == 5 and "unavailable" in no_cp.stderr
    # No NATS at all.
    down = NatsSettings(nats_url="nats://127.0.0.1:1", namespace=nats_settings.namespace, nats_connect_timeout_s=0.5)
    no_nats = await _mnemos(down, "workers", "ls")
    assert no_nats.exit_code == 5 and "unavailable" in no_nats.stderr


async def test_queue_full_exits_7(nats_settings, layout, demo_fn) -> None:
    from control_plane import ControlPlane, ControlPlaneSettings

    conn = await nats.connect(nats_settings.servers)
    cp = ControlPlane(conn, nats_settings, ControlPlaneSettings(max_queued_per_runtime=1))
    await cp.start()
    try:
        first = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--function", "noop")
        assert first.exit_code == 0, first.output  # queued: no worker runs python here

        async def refused() -> Any:
            result = await _mnemos(nats_settings, "submit", "-m", "demo-fn:v1", "--function", "noop")
            return result if result.exit_code == 7 else None

        full = await assert_eventually(refused, timeout=10, message="submit refused with queue_full")
        assert "queue_full" in full.stderr
    finally:
        await cp.stop()
        await conn.close()


def test_docs_table_matches_the_code() -> None:
    """docs/cli.md's exit-code table is the mapping the CLI uses, for every error code."""
    documented: dict[str, int] = {}
    for exit_code, codes in re.findall(r"^\| (\d+) \| [^|]* \| ([^|]*) \|$", DOCS.read_text(), flags=re.M):
        for code in re.findall(r"`([a-z_]+)`", codes):
            documented[code] = int(exit_code)
    assert set(EXIT_BY_CODE) <= set(documented)
    for code in ERROR_CLASSES:
        assert documented.get(code, EXIT_OTHER) == EXIT_BY_CODE.get(code, EXIT_OTHER), code
