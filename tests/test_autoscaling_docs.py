"""The pool commands of docs/autoscaling.md and docs/cli.md, run as a user would type them
(against a real control plane; the curl commands against a real gateway)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from launchers.cli import cli
from launchers.up import LOCAL_POOL, LOCAL_RUNTIMES
from mnemos.messages import PoolSpec
from mnemos.config import NatsSettings
from tests.test_http_docs import DOC_BASE, curl_commands, parse_curl

DOCS = Path(__file__).resolve().parents[1] / "docs"


def pool_commands(doc: str) -> list[list[str]]:
    """Every ``mnemos pools ...`` line of a doc's ``sh`` blocks, as argv after ``mnemos``."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", (DOCS / doc).read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if not argv or argv[0] not in ("mnemos", ".venv/bin/mnemos"):
                continue
            rest = argv[3:] if argv[1:3] == ["-o", "json"] else argv[1:]
            if rest[:1] == ["pools"]:
                out.append(argv[1:])
    return out


def test_the_docs_show_every_pools_command() -> None:
    shown = {argv[argv.index("pools") + 1] for argv in pool_commands("cli.md")}
    assert shown == {"set", "ls", "get", "rm"}
    assert len(pool_commands("autoscaling.md")) >= 4


async def test_pool_commands_of_the_docs_work(control_plane: Any, nats_settings: NatsSettings, demo_fn: Any,
                                              demo_model: Any, client: Any, start_gateway: Any) -> None:
    # As under `make up`: the pool `local` serves every model of its runtimes already.
    await client.set_pool(PoolSpec(name=LOCAL_POOL, runtimes=LOCAL_RUNTIMES, min_workers=1, max_workers=4))
    runner = CliRunner()
    base = ["--nats-url", nats_settings.nats_url, "--namespace", nats_settings.namespace]
    for doc in ("autoscaling.md", "cli.md"):
        for argv in pool_commands(doc):
            result = await _invoke(runner, [*base, *argv])
            assert result.exit_code == 0, f"{doc}: mnemos {shlex.join(argv)}\n{result.output}"
            if argv[-2:] == ["get", "gpu-small"]:
                assert "min 0 max 8" in result.output and "buffer 1" in result.output, result.output
    gateway = await start_gateway()
    async with httpx.AsyncClient(timeout=30) as http:
        for text in ((DOCS / "autoscaling.md").read_text(),):
            for argv in curl_commands(text):
                method, url, headers, data = parse_curl(argv)
                r = await http.request(method, url.replace(DOC_BASE, gateway), headers=headers, content=data)
                assert r.status_code == 200, (argv, r.status_code, r.text)


async def _invoke(runner: CliRunner, argv: list[str]) -> Any:
    import asyncio

    # The CLI runs its own event loop (asyncio.run): give it a thread of its own.
    return await asyncio.to_thread(runner.invoke, cli, argv)
