"""docs/apps.md cannot rot: its files, commands and programs run against a real stack.

The page is read top to bottom, as a reader follows it. A ```python file=NAME block is
written to NAME in a scratch directory; a ```console block's ``$`` lines run in a shell
there (``mnemos`` on the PATH, ``MNEMOS_NATS_URL``/``MNEMOS_NAMESPACE`` pointing at this
test's server and namespace) and must print the lines under them; a plain ```python
block runs as a program there and must print the ```text block that follows it. Output
is compared with doctest's rules (``...`` matches anything, whitespace is loose).
"""

from __future__ import annotations

import asyncio
import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "apps.md"
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.S | re.M)
_CHECK = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _steps(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, kind, body, expected) for each block: kind ``file:NAME``, ``console`` or ``python``."""
    blocks = list(_FENCE.finditer(text))
    steps = []
    for i, block in enumerate(blocks):
        info, body = block.group(1).strip(), block.group(2)
        line = text.count("\n", 0, block.start()) + 1
        if info.startswith("python file="):
            steps.append((line, "file:" + info.split("=", 1)[1], body, None))
        elif info == "console":
            steps.append((line, "console", body, None))
        elif info == "python":
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            expected = None
            if following is not None and following.group(1).strip() == "text" and \
                    not text[block.end():following.start()].strip():
                expected = following.group(2)
            steps.append((line, "python", body, expected))
    return steps


def _commands(body: str) -> list[tuple[str, str]]:
    """(command, expected output) of each ``$`` line of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return [(cmd, "\n".join(lines) + "\n") for cmd, lines in out]


async def test_apps_page_runs_as_written(nats_settings, control_plane, demo_model, start_worker, tmp_path) -> None:
    await start_worker(runtimes=["python"], max_concurrent_jobs=16)
    env = {**os.environ, "MNEMOS_NATS_URL": nats_settings.nats_url, "MNEMOS_NAMESPACE": nats_settings.namespace,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(tmp_path)}
    steps = _steps(DOC.read_text())
    kinds = [k for _, k, _, _ in steps]
    assert kinds.count("console") >= 4 and kinds.count("python") >= 4 and "file:hello_app.py" in kinds
    for line, kind, body, expected in steps:
        where = f"docs/apps.md:{line}"
        if kind.startswith("file:"):
            (tmp_path / kind[5:]).write_text(body)
            continue
        runs = _commands(body) if kind == "console" else [(None, expected)]
        for command, want in runs:
            argv = ["bash", "-c", command] if command is not None else [sys.executable, "-c", body]
            proc = await asyncio.to_thread(subprocess.run, argv, env=env, cwd=tmp_path, capture_output=True,
                                           text=True, timeout=180)
            assert proc.returncode == 0, f"{where}: {command or 'program'} exited {proc.returncode}:\n" \
                                         f"{proc.stdout}\n{proc.stderr[-3000:]}"
            if want is not None and want.strip():
                assert _CHECK.check_output(want, proc.stdout, _FLAGS), \
                    f"{where}: {command or 'program'} printed:\n{proc.stdout}\nwhere the page says:\n{want}"
