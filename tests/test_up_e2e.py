"""`mnemos up` as a user runs it: the whole local stack, streaming tokens, a clean Ctrl-C, a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mnemos.embedded import free_port

pytestmark = pytest.mark.e2e


def _start_up(data_dir: Path, port: int, gateway_port: int) -> subprocess.Popen[str]:
    env = dict(os.environ, MNEMOS_LOG_LEVEL="INFO", MNEMOS_WORKER_HEARTBEAT_INTERVAL_S="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers", "up", "--data-dir", str(data_dir), "--port", str(port),
         "--gateway-port", str(gateway_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Ctrl-C stops everything" in line:
            return proc
    proc.kill()
    logs = "".join(seen) + "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (data_dir / "logs").glob("*.log")
    )
    raise AssertionError(f"mnemos up did not come up:\n{logs}")


def _stop_up(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


ROOT = Path(__file__).resolve().parent.parent


def _user_env(data_dir: Path) -> dict[str, str]:
    """A user's shell beside `mnemos up --data-dir DATA_DIR`: MNEMOS_DATA_DIR names it, so
    the CLI and SDK find the credentials `up` wrote there (no MNEMOS_NATS_CREDS)."""
    env = {k: v for k, v in os.environ.items() if k != "MNEMOS_NATS_CREDS"}
    return dict(env, MNEMOS_DATA_DIR=str(data_dir))


def _mnemos(port: int, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launchers", "--nats-url", f"nats://127.0.0.1:{port}", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_user_env(data_dir),
    )


def _readme_first_python(port: int, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The README's first Python example, run as a user runs it beside `make up`."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(_user_env(data_dir), MNEMOS_NATS_URL=f"nats://127.0.0.1:{port}"), cwd=ROOT)


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _http_json(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _logs(data_dir: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((data_dir / "logs").glob("*.log")))


def test_make_up_streams_tokens_and_restarts_cleanly(tmp_path: Path) -> None:
    try:
        _scenario(tmp_path)
    except BaseException as e:  # the children's logs say what went wrong
        raise AssertionError(f"{e!r}\n{_logs(tmp_path)}") from e


def _scenario(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{http_port}"
    proc = _start_up(tmp_path, port, http_port)
    try:
        streamed = _mnemos(port, tmp_path, "submit", "--model", "demo-gpt2:v1", "--prompt", "hello", "--stream",
                           "--max-tokens", "12", "--temperature", "0")
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.strip(), "no tokens were printed"
        assert "completed" in streamed.stderr

        ran = _mnemos(port, tmp_path, "-o", "json", "submit", "--model", "demo-fn:v1", "--function", "add",
                      "--arg", "2", "--arg", "3", "--wait")
        assert ran.returncode == 0, ran.stderr
        record = json.loads(ran.stdout)
        assert record["status"] == "completed" and record["output"]["result"] == 5
        job_id = record["job_id"]

        workers = json.loads(_mnemos(port, tmp_path, "-o", "json", "workers", "ls").stdout)
        assert len(workers) == 1 and "transformers" in workers[0]["runtimes"]
        assert "demo-gpt2:v1" in workers[0]["loaded_models"]
        assert workers[0]["tags"]["pool"] == "local"  # started by the autoscaler's local provider

        # The README's first examples: the demo app that `up` deployed.
        added = _mnemos(port, tmp_path, "run", "examples/demo_app.py::add", "2", "3")
        assert added.returncode == 0 and added.stdout.strip() == "5", added.stdout + added.stderr
        tokens = _mnemos(port, tmp_path, "run", "examples/demo_app.py::Generator.generate", "Once upon a time",
                         "--kwarg", "max_tokens=8")
        assert tokens.returncode == 0 and tokens.stdout.strip(), tokens.stdout + tokens.stderr
        example = _readme_first_python(port, tmp_path)
        assert example.returncode == 0, example.stderr
        lines = example.stdout.strip().splitlines()
        assert len(lines) == 2 and lines[0] and len(json.loads(lines[1])) == 4, example.stdout
        apps = json.loads(_mnemos(port, tmp_path, "-o", "json", "apps", "ls").stdout)
        assert [a["name"] for a in apps] == ["demo"]

        # The autoscaler's pool, as `mnemos pools get local` shows it.
        pool = json.loads(_mnemos(port, tmp_path, "-o", "json", "pools", "get", "local").stdout)
        assert pool["spec"]["min_workers"] == 1 and pool["spec"]["max_workers"] == 4
        assert pool["status"]["ready"] == 1 and pool["status"]["decisions"][0]["action"] == "scale_up"
        shown = _mnemos(port, tmp_path, "pools", "get", "local")
        assert shown.returncode == 0 and "scale_up" in shown.stdout, shown.stdout + shown.stderr

        # NATS takes only the users `up` minted: a shell without the data directory (no
        # credentials) is refused by nats-server, and told what to set.
        anonymous = subprocess.run(
            [sys.executable, "-m", "launchers", "--nats-url", f"nats://127.0.0.1:{port}", "jobs", "ls"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={k: v for k, v in _user_env(tmp_path).items() if k != "MNEMOS_DATA_DIR"})
        assert anonymous.returncode == 5, anonymous.stdout + anonymous.stderr
        assert "Authorization Violation" in anonymous.stderr and "MNEMOS_DATA_DIR" in anonymous.stderr

        # The gateway that `up` started: the banner's curl example, and a job submitted over HTTP.
        completion = _http_json(f"{gateway}/v1/completions",
                                {"model": "demo-gpt2:v1", "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert completion["object"] == "text_completion"
        assert completion["usage"]["completion_tokens"] >= 1  # type: ignore[index]
        assert _http_json(f"{gateway}/v1/jobs/{job_id}")["status"] == "completed"
    finally:
        out = _stop_up(proc)
    assert "stopped." in out
    assert _port_closed(port) and _port_closed(http_port)
    assert not list((tmp_path / "autoscaler").glob("*/*/*.json")), "a local worker outlived `up`"

    # A second `up` on the same data directory: the earlier job is still there.
    proc = _start_up(tmp_path, port, http_port)
    try:
        got = _mnemos(port, tmp_path, "-o", "json", "jobs", "get", job_id)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["output"]["result"] == 5
        listed = json.loads(_mnemos(port, tmp_path, "-o", "json", "jobs", "ls").stdout)
        assert job_id in [j["job_id"] for j in listed["jobs"]]
    finally:
        _stop_up(proc)
