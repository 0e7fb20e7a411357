"""The API's endpoints are declared once (mnemos.endpoints): the docs list exactly those, and
a server binds a handler to each of them or does not start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnemos.endpoints import ENDPOINTS, JOBS_GET, Endpoint, bind, endpoint
from mnemos.errors import Internal
from mnemos.messages import GetJob, JobRecord
from mnemos.names import Names

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def endpoint_table() -> list[list[str]]:
    """The body rows of api.md's endpoint table."""
    lines = API_DOC.read_text().splitlines()
    start = lines.index("| subject | micro endpoint | request body | reply body |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_api_doc_lists_exactly_the_declared_endpoints() -> None:
    documented = []
    for subject, micro_name, request, reply in endpoint_table():
        first = [re.findall(r"`([^`]+)`", cell)[0] for cell in (subject, micro_name, request, reply)]
        documented.append((*first, "(body optional)" in request))
    declared = [(e.subject(Names()), e.micro_name, e.request.__name__, e.reply.__name__, e.body_optional)
                for e in ENDPOINTS]
    assert documented == declared


def test_endpoints_are_found_by_name() -> None:
    assert endpoint("jobs.get") is JOBS_GET
    assert (JOBS_GET.request, JOBS_GET.reply, JOBS_GET.micro_name) == (GetJob, JobRecord, "jobs-get")
    assert JOBS_GET.subject(Names("acme")) == "acme.api.jobs.get"
    with pytest.raises(KeyError):
        endpoint("jobs.nope")
    with pytest.raises(ValueError, match="noun"):
        Endpoint("jobs-get", GetJob, JobRecord, "not a subject suffix")


def test_bind_pairs_every_endpoint_with_its_handler_in_declared_order() -> None:
    handlers = {e: e.name for e in reversed(ENDPOINTS)}
    assert bind(handlers) == [(e, e.name) for e in ENDPOINTS]


def test_bind_refuses_a_missing_or_an_undeclared_handler() -> None:
    with pytest.raises(Internal, match=r"without a handler: \['jobs.get'\]"):
        bind({e: None for e in ENDPOINTS if e is not JOBS_GET})
    stray = Endpoint("jobs.frobnicate", GetJob, JobRecord, "not declared")
    with pytest.raises(Internal, match=r"undeclared endpoints: \['jobs.frobnicate'\]"):
        bind({**{e: None for e in ENDPOINTS}, stray: None})
    # Same name, another declaration: not the declared endpoint either.
    twin = Endpoint("jobs.get", GetJob, JobRecord, "a copy with another description")
    with pytest.raises(Internal, match=r"undeclared endpoints: \['jobs.get'\]"):
        bind({**{e: None for e in ENDPOINTS}, twin: None})
