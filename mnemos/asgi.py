"""uvicorn on the caller's event loop, on a socket the caller binds.

Every MNEMOS process that speaks HTTP (the gateway, the metrics endpoints of the control
plane and workers) runs its ASGI app this way: binding first turns a taken port into an
``OSError`` the caller can report (uvicorn would ``sys.exit``), port 0 reveals the port it
got, and signals stay with the process's own shutdown order instead of uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn

__all__ = ["AsgiServer"]

_START_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for sockets
    # that say they are TCP; without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class AsgiServer:
    """An ASGI app served by uvicorn until :meth:`stop` (graceful: open requests finish)."""

    def __init__(self, app: Any, host: str, port: int, *, lifespan: Literal["on", "off"] = "off",
                 graceful_timeout_s: float = 10.0) -> None:
        self.host = host
        self._port = port
        self._config = uvicorn.Config(app, host=host, port=port, lifespan=lifespan, interface="asgi3",
                                      log_level="warning", access_log=False,
                                      timeout_graceful_shutdown=int(graceful_timeout_s))
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS picked, for port 0)."""
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    async def start(self) -> None:
        """Bind (``OSError`` if the address is taken) and serve; returns once it accepts."""
        if self._task is not None:
            return
        self._sock = _bind(self.host, self._port)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name=f"http-{self.port}")
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not self._server.started:
                if self._task.done():
                    await self._task  # its exception, if any
                    raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped while starting")
                await asyncio.sleep(0.01)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set or the server ends by itself."""
        await self.start()
        assert self._task is not None
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({self._task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (bounded), close. Safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        self._server.should_exit = True
        try:
            await task
        finally:
            if self._sock is not None:
                self._sock.close()
