"""Everything a tenant can send is bounded (``mnemos/bounds.py`` and the message types):
each bound passes at its value and refuses past it with ``validation_error`` naming the
path and the bound; the control plane refuses such a job before storing anything."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from mnemos import bounds
from mnemos.client import job_spec
from mnemos.errors import ValidationFailed
from mnemos.messages import ChatMessage, JobSpec, decode


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _spec(**input_fields: Any) -> JobSpec:
    spec = job_spec("demo-fn:v1")
    for name, value in input_fields.items():
        setattr(spec.input, name, value)
    return spec


@pytest.mark.parametrize(("make", "limit"), [
    (lambda n: _spec(args=_nested(n)), "depth"),
    (lambda n: _spec(kwargs={"k": _nested(n - 1)}), "depth"),
    (lambda n: _spec(context={"c": _nested(n - 1)}), "depth"),
])
def test_nesting_is_bounded(make: Any, limit: str) -> None:
    bounds.check_job(make(bounds.MAX_DEPTH))
    with pytest.raises(ValidationFailed) as refused:
        bounds.check_job(make(bounds.MAX_DEPTH + 1))
    assert refused.value.details is not None and refused.value.details["limit"] == limit


def test_sizes_are_bounded() -> None:
    cases: list[tuple[JobSpec, JobSpec, str, str]] = [
        (_spec(args=[0] * (bounds.MAX_VALUES - 1)), _spec(args=[0] * bounds.MAX_VALUES), "$.input.args", "values"),
        (_spec(args=["x" * bounds.MAX_STRING_CHARS]), _spec(args=["x" * (bounds.MAX_STRING_CHARS + 1)]),
         "$.input.args", "string_chars"),
        (_spec(kwargs={"k" * bounds.MAX_STRING_CHARS: 1}), _spec(kwargs={"k" * (bounds.MAX_STRING_CHARS + 1): 1}),
         "$.input.kwargs", "string_chars"),
        (_spec(prompt="p" * bounds.MAX_PROMPT_CHARS), _spec(prompt="p" * (bounds.MAX_PROMPT_CHARS + 1)),
         "$.input.prompt", "prompt_chars"),
        (_spec(messages=[ChatMessage(role="user", content="m")] * bounds.MAX_MESSAGES),
         _spec(messages=[ChatMessage(role="user", content="m")] * (bounds.MAX_MESSAGES + 1)),
         "$.input.messages", "messages"),
    ]
    for fits, past, path, limit in cases:
        bounds.check_job(fits)
        with pytest.raises(ValidationFailed) as refused:
            bounds.check_job(past)
        assert refused.value.details == {"path": path, "limit": limit, "bound": refused.value.details["bound"]}
    spec = job_spec("demo-fn:v1")
    spec.metadata = {f"k{i}": i for i in range(bounds.MAX_METADATA_KEYS + 1)}
    with pytest.raises(ValidationFailed, match="metadata"):
        bounds.check_job(spec)


def test_the_types_bound_the_rest() -> None:
    def spec_with(fields: dict[str, Any]) -> str:
        return json.dumps({"model": {"family": "demo-fn", "version": "v1"}, **fields})

    refused = [
        {"input": {"parameters": {"stop": ["s"] * 17}}},
        {"input": {"parameters": {"stop": ["s" * 1001]}}},
        {"input": {"parameters": {"max_tokens": 32769}}},
        {"input": {"parameters": {"top_k": 100_001}}},
        {"idempotency_key": "k" * 257},
        {"retry_config": {"retry_on_errors": ["e"] * 33}},
        {"retry_config": {"retry_on_errors": ["e" * 65]}},
    ]
    for fields in refused:
        with pytest.raises(ValidationFailed):
            decode(spec_with(fields), JobSpec)


async def test_the_control_plane_refuses_a_job_past_a_bound(control_plane: Any, demo_fn: Any, client: Any,
                                                             start_gateway: Any) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await client.submit(job_spec("demo-fn:v1", args=[_nested(bounds.MAX_DEPTH + 1)]))
    assert refused.value.details is not None and refused.value.details["limit"] == "depth"
    assert (await client.list()).jobs == []  # nothing was stored
    gateway = await start_gateway()
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        r = await http.post("/v1/jobs", json={"model": {"family": "demo-fn", "version": "v1"},
                                              "input": {"args": [_nested(bounds.MAX_DEPTH + 1)]}})
        assert r.status_code == 422 and r.json()["error"]["details"]["limit"] == "depth", r.text
