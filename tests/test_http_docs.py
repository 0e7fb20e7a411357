"""Every curl command of docs/http-api.md, run against a test stack (so the docs cannot rot).

The commands are parsed (method, headers, body, URL) and sent with httpx to the test
gateway instead of http://127.0.0.1:8080; ``<job_id>`` becomes a real job.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import assert_eventually

DOC = Path(__file__).resolve().parents[1] / "docs" / "http-api.md"
DOC_BASE = "http://127.0.0.1:8080"


def curl_commands(text: str) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("curl "):
                commands.append(shlex.split(line))
    return commands


def parse_curl(argv: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    method, url, headers, data = "GET", "", {}, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = next(args)
            method = "POST" if method == "GET" else method
        elif arg in ("-s", "-N"):
            continue
        elif arg.startswith("http"):
            url = arg
        else:
            raise AssertionError(f"the doc test does not understand curl option {arg!r}")
    return method, url, headers, data


def test_the_doc_has_commands_for_every_route() -> None:
    urls = " ".join(parse_curl(c)[1] for c in curl_commands(DOC.read_text()))
    for path in ("/v1/jobs?", "/v1/jobs/<job_id>", "/retry", "/events", "/v1/completions", "/v1/chat/completions",
                 "/v1/models", "/v1/workers", "/v1/pools", "/v1/pools/batch", "/v1/apps", "/v1/apps/demo",
                 "/v1/actors", "/v1/tenants", "/v1/tenants/acme"):
        assert path in urls, path


async def test_every_curl_command_of_the_doc_works(control_plane: Any, start_worker: Any, demo_model: Any,
                                                  demo_fn: Any, start_gateway: Any, client: Any,
                                                  nats_settings: Any) -> None:
    from launchers.deploy import deploy
    from launchers.up import DEMO_APP, LOCAL_POOL, LOCAL_RUNTIMES
    from mnemos.messages import PoolSpec

    # As under `make up`: the pool `local` serves every model of its runtimes already.
    await client.set_pool(PoolSpec(name=LOCAL_POOL, runtimes=LOCAL_RUNTIMES, min_workers=1, max_workers=4))
    await deploy(nats_settings, DEMO_APP)  # as `make up` does
    await start_worker()
    base = await start_gateway()
    async with httpx.AsyncClient(timeout=60) as http:
        job = (await http.post(f"{base}/v1/jobs", json={
            "model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "sleep"}},
            "input": {"args": [1.0]}})).json()
        job_id = job["job_id"]
        ran = 0
        for argv in curl_commands(DOC.read_text()):
            method, url, headers, data = parse_curl(argv)
            if "/retry" in url:  # a retry needs the cancel before it confirmed
                async def ended() -> bool:
                    r = await http.get(f"{base}/v1/jobs/{job_id}")
                    return r.json()["status"] in ("cancelled", "completed")

                await assert_eventually(ended, timeout=20, message="cancel confirmed")
            url = url.replace(DOC_BASE, base).replace("<job_id>", job_id)
            r = await http.request(method, url, headers=headers, content=data)
            assert r.status_code < 400, (argv, r.status_code, r.text)
            if "/events" in url:
                assert "event: final" in r.text, r.text
            ran += 1
        assert ran >= 12
