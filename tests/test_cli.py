"""The `mnemos` CLI as scripts use it: exit codes, JSON output, model push with progress."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mnemos.config import NatsSettings


async def _cli(settings: NatsSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the event loop (the control plane under test runs on it)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "launchers", "--nats-url", settings.nats_url, "--namespace", settings.namespace, *args],
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
        [sys.executable, "-m", "launchers", "--nats-url", "nats://127.0.0.1:1", "jobs", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 5 and "unavailable" in down.stderr


async def test_wait_shows_the_job_status_on_a_terminal(nats_settings, control_plane, demo_fn, start_worker) -> None:
    """`submit --wait` shows a spinner with the job's status when stderr is a terminal; stdout
    (the record) stays clean."""
    await start_worker()
    master, slave = pty.openpty()

    def run() -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [sys.executable, "-m", "launchers", "--nats-url", nats_settings.nats_url, "--namespace",
                 nats_settings.namespace, "submit", "-m", "demo-fn:v1", "--function", "sleep", "--arg", "1", "--wait"],
                stdout=subprocess.PIPE, stderr=slave, text=True, timeout=60, env={**os.environ, "TERM": "xterm"},
            )
        finally:
            os.close(slave)

    def read_terminal() -> str:
        out = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            out.append(data)
        os.close(master)
        return b"".join(out).decode(errors="replace")

    proc, terminal = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(read_terminal))
    assert proc.returncode == 0
    job_id = re.search(r"job\s+(\w{26})", proc.stdout)
    assert job_id is not None and "completed" in proc.stdout and "\x1b" not in proc.stdout
    assert job_id.group(1) in terminal and "running on w0-" in terminal  # the status the worker announced


def test_every_command_line_in_the_cli_docs_parses() -> None:
    """Each `mnemos ...` line of docs/cli.md names commands and options that exist (it is
    parsed up to `--help`, so nothing runs; what the commands do is tested above and in
    test_cli_exit_codes.py)."""
    from click.testing import CliRunner

    from launchers.cli import cli

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    lines = [line for block in re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)
             for line in block.replace("\\\n", " ").splitlines() if line.startswith("mnemos ")]
    assert len(lines) >= 25
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        argv = list(itertools.takewhile(lambda a: a not in (">", "|", "&&", ";"), argv))
        argv = [a.replace("<job_id>", "01M84A76B4ZZWPFWTGRK0WD4F1") for a in argv]
        result = CliRunner().invoke(cli, [*argv, "--help"])
        assert result.exit_code == 0, f"{line}\n{result.output}"
