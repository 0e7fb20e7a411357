"""``mnemos zygote``: a pre-started process that forks ready-to-run workers on demand.

A worker process spends most of its start importing (torch, transformers, the runtimes).
The ``local`` provider keeps one zygote per autoscaler: it imports all of that once, then
waits for requests on stdin, one JSON object per line::

    {"worker_id": "default-3fa2c1", "env": {"MNEMOS_NATS_URL": "...", ...}, "log": "/path/worker.log"}

and for each forks a child that becomes ``mnemos worker`` with exactly that environment
(in its own session, its output in ``log``), answering ``{"worker_id": ..., "pid": ...}``
on stdout. Children outlive the zygote and the autoscaler: a worker drains only when told
to. The zygote dies with its parent (the autoscaler) and reaps nothing: children it forks
are re-parented and reaped by the system when they exit.

Nothing runs an event loop or a thread pool in the zygote before a fork: a child starts
as clean as a fresh process, minus the imports.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from typing import Any

__all__ = ["main", "preload"]


def preload() -> float:
    """Import what a worker imports before it serves; the seconds it took."""
    t0 = time.perf_counter()
    import launchers.cli  # noqa: F401 - the worker command itself
    import neuron_runtime.main  # noqa: F401
    import neuron_runtime.worker  # noqa: F401
    from neuron_runtime import runtimes  # noqa: F401

    for name in ("neuron_runtime.runtimes.python", "neuron_runtime.runtimes.pytorch",
                 "neuron_runtime.runtimes.transformers"):
        try:
            __import__(name)
        except ImportError:  # a runtime this machine cannot run
            pass
    # What loading any Hugging Face model imports the first time (modeling_utils alone is
    # most of a second here); the architecture's own module is small and imported on demand.
    for name in ("torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
                 "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                 "huggingface_hub.serialization._torch", "safetensors.torch"):
        try:
            importlib.import_module(name)
        except ImportError:  # not installed on this machine
            pass
    return time.perf_counter() - t0


def _become_worker(env: dict[str, str], log_path: str) -> None:
    """In the forked child: a new session, the given environment and log, then the worker."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own fds
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    from launchers.cli import main as mnemos_main

    code = 0
    try:
        sys.argv = ["mnemos", "worker"]
        mnemos_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit non-zero, never return to the zygote loop
        import traceback

        traceback.print_exc()
        code = 10
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _answer(out: Any, body: dict[str, Any]) -> None:
    out.write(json.dumps(body) + "\n")
    out.flush()


def main() -> int:
    """Serve fork requests from stdin until it closes."""
    # Forked children are not waited for here: the kernel reaps them (they are re-parented
    # when the zygote goes), and the provider follows them by pid.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which closes stdin
    out = sys.stdout
    seconds = preload()
    _answer(out, {"ready": True, "preload_s": round(seconds, 3), "pid": os.getpid()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            worker_id = str(req["worker_id"])
            env = {str(k): str(v) for k, v in dict(req["env"]).items()}
            log_path = str(req["log"])
        except (ValueError, KeyError, TypeError) as e:
            _answer(out, {"error": f"bad request: {e!r}"})
            continue
        try:
            pid = os.fork()
        except OSError as e:
            _answer(out, {"worker_id": worker_id, "error": f"fork failed: {e!r}"})
            continue
        if pid == 0:
            _become_worker(env, log_path)
        _answer(out, {"worker_id": worker_id, "pid": pid})
    return 0
