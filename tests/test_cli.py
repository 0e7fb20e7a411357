"""The `mnemos` CLI as scripts use it: exit codes, JSON output, model push with progress."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from mnemos.config import NatsSettings


async def _cli(settings: NatsSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the event loop (the control plane under test runs on it)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mnemos", "--nats-url", settings.nats_url, "--namespace", settings.namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_models_push_and_ls(nats_settings, layout, control_plane, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "functions.py").write_text("def hello(name):\n    return f'hello {name}'\n")
    (model_dir / "weights.bin").write_bytes(b"\x00" * 300_000)
    push = ["models", "push", str(model_dir), "--family", "greeter", "--version", "v1", "--runtime", "python",
            "--config", '{"entrypoint": "functions.py:hello"}', "--alias", "greeter-latest"]
    pushed = await _cli(nats_settings, *push)
    assert pushed.returncode == 0, pushed.stderr
    assert "registered greeter:v1" in pushed.stdout
    listed = json.loads((await _cli(nats_settings, "-o", "json", "models", "ls")).stdout)
    [model] = listed
    assert model["family"] == "greeter" and model["aliases"] == ["greeter-latest"]
    assert {f["path"]: f["size"] for f in model["files"]} == {
        "functions.py": (model_dir / "functions.py").stat().st_size,
        "weights.bin": 300_000,
    }
    again = await _cli(nats_settings, *push[:-2])  # the same version again, without the alias
    assert again.returncode == 6 and "conflict" in again.stderr  # exists: exit code 6


async def test_exit_codes(nats_settings, control_plane, demo_fn, start_worker) -> None:
    await start_worker()
    missing = await _cli(nats_settings, "jobs", "get", "NOSUCHJOB")
    assert missing.returncode == 3 and "job_not_found" in missing.stderr
    invalid = await _cli(nats_settings, "submit", "--model", "demo-fn:v1", "--temperature", "7", "--prompt", "x")
    assert invalid.returncode == 4 and "validation_error" in invalid.stderr
    failed = await _cli(nats_settings, "-o", "json", "submit", "--model", "demo-fn:v1", "--function", "fail", "--wait")
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    ok = await _cli(
        nats_settings,
        "-o",
        "json",
        "submit",
        "--model",
        "demo-fn:v1",
        "--function",
        "echo",
        "--arg",
        "[1,2]",
        "--kwarg",
        "x=3",
        "--wait",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["output"]["result"] == {"args": [[1, 2]], "kwargs": {"x": 3}}
    down = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mnemos", "--nats-url", "nats://127.0.0.1:1", "jobs", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 5 and "unavailable" in down.stderr
