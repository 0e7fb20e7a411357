"""docs/sdk.md cannot rot: every python example runs against a real control plane and worker.

Each ```python block is a complete program. It runs in its own interpreter, as a user would
run it beside ``make up``, with ``MNEMOS_NATS_URL`` / ``MNEMOS_NAMESPACE`` pointing at this
test's server and namespace (the examples take both from the environment, through
``NatsSettings``). When a ```text block follows, the program must print that (doctest
rules: ``...`` matches anything, whitespace differences do not count). The blocks run in
page order against one platform, as a reader would run them.
"""

from __future__ import annotations

import asyncio
import doctest
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launchers.cli import EXIT_BY_CODE, EXIT_OTHER
from mnemos.errors import ERROR_CLASSES

DOC = Path(__file__).resolve().parent.parent / "docs" / "sdk.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass
class Example:
    line: int
    code: str
    expected: str | None


def examples(text: str) -> list[Example]:
    """The python blocks of ``text``, each with the text block right after it (if any)."""
    blocks = list(_FENCE.finditer(text))
    found = []
    for i, block in enumerate(blocks):
        if block.group(1) != "python":
            continue
        expected = None
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if following is not None and following.group(1) == "text" and not text[block.end():following.start()].strip():
            expected = following.group(2)
        found.append(Example(text.count("\n", 0, block.start()) + 1, block.group(2), expected))
    return found


async def test_sdk_examples_run_and_print_what_the_page_says(
    nats_settings, control_plane, demo_fn, demo_model, start_worker, tmp_path: Path
) -> None:
    await start_worker()
    env = {**os.environ, "MNEMOS_NATS_URL": nats_settings.nats_url, "MNEMOS_NAMESPACE": nats_settings.namespace}
    found = examples(DOC.read_text())
    assert len(found) >= 8 and all(e.expected is not None for e in found)
    checker = doctest.OutputChecker()
    failures = []
    for example in found:
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", example.code], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120,
        )
        where = f"docs/sdk.md:{example.line}"
        if proc.returncode != 0:
            failures.append(f"{where} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        elif example.expected is not None and not checker.check_output(
            example.expected, proc.stdout, doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        ):
            failures.append(f"{where} printed:\n{proc.stdout}\nwhere the page says:\n{example.expected}")
    assert not failures, "\n\n".join(failures)


def test_error_table_matches_the_error_classes() -> None:
    """The table of docs/sdk.md#errors: one row per error code, with its class, status,
    retryable default and CLI exit code as the code has them."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (\d+) \| (yes|no) \| .* \| (\d+) \|$", DOC.read_text(), flags=re.M)
    documented = {code: (cls, int(status), retryable == "yes", int(exit_code))
                  for cls, code, status, retryable, exit_code in rows}
    actual = {code: (cls.__name__, cls.status, cls.retryable_default, EXIT_BY_CODE.get(code, EXIT_OTHER))
              for code, cls in ERROR_CLASSES.items()}
    assert documented == actual
