"""How big and how deep what a tenant sends may be: one place for the bounds of a job.

The message types (:mod:`mnemos.messages`) bound each field they can (priorities,
``max_tokens``, the number and length of stop strings, key lengths); this module bounds
what a type cannot say: the nesting and the size of the free-form JSON a job carries
(``input.args``, ``input.kwargs``, ``input.context``, ``metadata``,
``model.runtime_config``), and the length of a prompt or chat. The control plane checks
every job it accepts (:func:`check_job`) before anything is stored; a job past a bound is
refused with ``validation_error`` whose ``details`` name the path, the bound and its value.
"""

from __future__ import annotations

from typing import Any

from mnemos.errors import ValidationFailed
from mnemos.messages import JobSpec

__all__ = ["check_job", "MAX_DEPTH", "MAX_VALUES", "MAX_STRING_CHARS", "MAX_PROMPT_CHARS", "MAX_MESSAGES",
           "MAX_METADATA_KEYS"]

#: Nesting of the free-form JSON of a job (a list or object inside another counts one).
MAX_DEPTH = 32
#: Values (scalars, lists, objects) in one free-form field of a job.
MAX_VALUES = 100_000
#: Characters of one string (or object key) inside the free-form JSON.
MAX_STRING_CHARS = 1_000_000
#: Characters of ``input.prompt``, and of all ``input.messages`` contents together.
MAX_PROMPT_CHARS = 1_000_000
#: Turns of ``input.messages``.
MAX_MESSAGES = 1_000
#: Keys of ``metadata`` (it is stored with the job and shown by every listing).
MAX_METADATA_KEYS = 64


def _refuse(path: str, limit: str, bound: int, message: str) -> ValidationFailed:
    return ValidationFailed(message, details={"path": path, "limit": limit, "bound": bound})


def _walk(value: Any, path: str) -> None:
    """Check one free-form field: depth, number of values, string lengths (iteratively:
    a deep value cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise _refuse(path, "values", MAX_VALUES, f"{path} holds more than {MAX_VALUES} values")
        if isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                raise _refuse(path, "string_chars", MAX_STRING_CHARS,
                              f"a string in {path} is longer than {MAX_STRING_CHARS} characters")
            continue
        if isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise _refuse(path, "depth", MAX_DEPTH, f"{path} is nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    if len(key) > MAX_STRING_CHARS:
                        raise _refuse(path, "string_chars", MAX_STRING_CHARS,
                                      f"a key in {path} is longer than {MAX_STRING_CHARS} characters")
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def check_job(spec: JobSpec) -> None:
    """Raise :class:`ValidationFailed` if ``spec`` is past a bound of this module."""
    inp = spec.input
    if inp.prompt is not None and len(inp.prompt) > MAX_PROMPT_CHARS:
        raise _refuse("$.input.prompt", "prompt_chars", MAX_PROMPT_CHARS,
                      f"input.prompt is longer than {MAX_PROMPT_CHARS} characters")
    if inp.messages is not None:
        if len(inp.messages) > MAX_MESSAGES:
            raise _refuse("$.input.messages", "messages", MAX_MESSAGES,
                          f"input.messages has more than {MAX_MESSAGES} turns")
        if sum(len(m.content) for m in inp.messages) > MAX_PROMPT_CHARS:
            raise _refuse("$.input.messages", "prompt_chars", MAX_PROMPT_CHARS,
                          f"input.messages hold more than {MAX_PROMPT_CHARS} characters")
    if len(spec.metadata) > MAX_METADATA_KEYS:
        raise _refuse("$.metadata", "keys", MAX_METADATA_KEYS, f"metadata has more than {MAX_METADATA_KEYS} keys")
    for path, value in (("$.input.args", inp.args), ("$.input.kwargs", inp.kwargs), ("$.input.context", inp.context),
                        ("$.metadata", spec.metadata), ("$.model.runtime_config", spec.model.runtime_config)):
        if value is not None:
            _walk(value, path)
