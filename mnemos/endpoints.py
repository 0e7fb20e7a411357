"""Every endpoint of the control plane's API, declared once.

An :class:`Endpoint` names what a caller sends and what it gets back. The control plane
registers exactly these (:func:`bind` pairs each with its handler and refuses a missing or
an extra one), the clients call them through one typed path (``Client._call(endpoint,
request)`` returns ``endpoint.reply``), and docs/api.md lists them (a test compares).
The subject is built by :meth:`Names.api_subject <mnemos.names.Names.api_subject>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mnemos.errors import Internal
from mnemos.messages import (
    ActorList,
    ListActors,
    AppDeployed,
    AppList,
    AppRecord,
    DeployApp,
    GetApp,
    ListApps,
    CancelJob,
    GetJob,
    GetModel,
    JobList,
    JobRecord,
    JobSpec,
    ListJobs,
    ListModels,
    ListWorkers,
    ModelList,
    ModelRecord,
    GetPool,
    ListPools,
    PoolList,
    PoolView,
    RemovePool,
    RetryJob,
    SetPool,
    GetTenant,
    ListTenants,
    RemoveTenant,
    SetTenant,
    TenantList,
    TenantView,
    WorkerList,
)
from mnemos.names import Names

__all__ = [
    "Endpoint",
    "ENDPOINTS",
    "JOBS_SUBMIT",
    "JOBS_RUN",
    "JOBS_START",
    "JOBS_GET",
    "JOBS_LIST",
    "JOBS_CANCEL",
    "JOBS_RETRY",
    "WORKERS_LIST",
    "MODELS_LIST",
    "MODELS_GET",
    "POOLS_LIST",
    "POOLS_GET",
    "POOLS_SET",
    "POOLS_DELETE",
    "TENANTS_LIST",
    "TENANTS_GET",
    "TENANTS_SET",
    "TENANTS_DELETE",
    "APPS_LIST",
    "APPS_GET",
    "APPS_DEPLOY",
    "ACTORS_LIST",
    "bind",
    "endpoint",
]

Req = TypeVar("Req")
Rep = TypeVar("Rep")
H = TypeVar("H")

_NAME_RE = re.compile(r"^[a-z]+\.[a-z]+$")


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[Req, Rep]):
    """One request/reply endpoint: a ``request`` body in, a ``reply`` body out (or the
    error envelope, :class:`~mnemos.messages.ErrorReply`)."""

    #: ``jobs.submit``: the subject suffix (``mnemos.api.jobs.submit``).
    name: str
    request: type[Req]
    reply: type[Rep]
    #: What it does, in a sentence.
    description: str
    #: An empty body is taken as ``{}`` (every field of ``request`` has a default).
    body_optional: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"endpoint name {self.name!r} must be '<noun>.<verb>' in a-z")

    @property
    def micro_name(self) -> str:
        """The nats micro endpoint name (``jobs-submit``): what ``nats micro info/stats`` show."""
        return self.name.replace(".", "-")

    def subject(self, names: Names) -> str:
        return names.api_subject(self.name)


JOBS_SUBMIT = Endpoint("jobs.submit", JobSpec, JobRecord, "Queue a job; the reply is its record, status queued.")
JOBS_RUN = Endpoint("jobs.run", JobSpec, JobRecord, "Queue a job; the reply is its record once the job has ended.")
JOBS_START = Endpoint("jobs.start", JobSpec, JobRecord,
                      "Queue a job; the reply is its record at once (status queued), and a second message "
                      "on the same subject is its record once it has ended.")
JOBS_GET = Endpoint("jobs.get", GetJob, JobRecord, "A job's record.")
JOBS_LIST = Endpoint("jobs.list", ListJobs, JobList, "A page of jobs, newest first.", body_optional=True)
JOBS_CANCEL = Endpoint("jobs.cancel", CancelJob, JobRecord, "Cancel a queued or running job.")
JOBS_RETRY = Endpoint("jobs.retry", RetryJob, JobRecord, "Queue an ended job again.")
WORKERS_LIST = Endpoint("workers.list", ListWorkers, WorkerList, "The live workers.", body_optional=True)
MODELS_LIST = Endpoint("models.list", ListModels, ModelList, "The registered models.", body_optional=True)
MODELS_GET = Endpoint("models.get", GetModel, ModelRecord, "A model's record, by name or alias.")
POOLS_LIST = Endpoint("pools.list", ListPools, PoolList, "The pools with their status.", body_optional=True)
POOLS_GET = Endpoint("pools.get", GetPool, PoolView, "One pool's settings, status and latest scaling decisions.")
POOLS_SET = Endpoint("pools.set", SetPool, PoolView, "Create or replace a pool (the autoscaler follows at once).")
POOLS_DELETE = Endpoint("pools.delete", RemovePool, PoolView,
                        "Remove a pool; the autoscaler drains its workers. The reply is the pool as it was.")
APPS_LIST = Endpoint("apps.list", ListApps, AppList, "The deployed apps.", body_optional=True)
APPS_GET = Endpoint("apps.get", GetApp, AppRecord, "A deployed app: its live version and definitions.")
APPS_DEPLOY = Endpoint("apps.deploy", DeployApp, AppDeployed,
                       "Make a registered app version live and size its pool (a no-op if it already is).")
TENANTS_LIST = Endpoint("tenants.list", ListTenants, TenantList,
                        "The tenants' quotas with their use (a tenant sees its own).", body_optional=True)
TENANTS_GET = Endpoint("tenants.get", GetTenant, TenantView, "One tenant's quota and use (a tenant: its own).")
TENANTS_SET = Endpoint("tenants.set", SetTenant, TenantView, "Set a tenant's quota (the operator's).")
TENANTS_DELETE = Endpoint("tenants.delete", RemoveTenant, TenantView,
                          "Remove a tenant's quota (no bound any more). The reply is the quota as it was.")
ACTORS_LIST = Endpoint("actors.list", ListActors, ActorList,
                       "The live actor activations: key, host, calls, last call.", body_optional=True)

#: Every endpoint, in the order docs/api.md lists them.
ENDPOINTS: tuple[Endpoint[Any, Any], ...] = (
    JOBS_SUBMIT, JOBS_RUN, JOBS_START, JOBS_GET, JOBS_LIST, JOBS_CANCEL, JOBS_RETRY, WORKERS_LIST, MODELS_LIST,
    MODELS_GET, POOLS_LIST, POOLS_GET, POOLS_SET, POOLS_DELETE, TENANTS_LIST, TENANTS_GET, TENANTS_SET,
    TENANTS_DELETE, APPS_LIST, APPS_GET, APPS_DEPLOY, ACTORS_LIST,
)

_BY_NAME: dict[str, Endpoint[Any, Any]] = {e.name: e for e in ENDPOINTS}
assert len(_BY_NAME) == len(ENDPOINTS), "two endpoints share a name"


def endpoint(name: str) -> Endpoint[Any, Any]:
    """The endpoint called ``name`` (``jobs.get``); :class:`KeyError` if none is."""
    return _BY_NAME[name]


def bind(handlers: Mapping[Endpoint[Any, Any], H]) -> list[tuple[Endpoint[Any, Any], H]]:
    """``(endpoint, handler)`` for every declared endpoint, in declared order. A declared
    endpoint without a handler, or a handler for an endpoint that is not declared, is a
    bug of the server: :class:`~mnemos.errors.Internal`, before anything is served."""
    missing = [e.name for e in ENDPOINTS if e not in handlers]
    undeclared = [e.name for e in handlers if _BY_NAME.get(e.name) != e]
    if missing or undeclared:
        raise Internal(f"endpoints without a handler: {missing or 'none'}; "
                       f"handlers of undeclared endpoints: {undeclared or 'none'}")
    return [(e, handlers[e]) for e in ENDPOINTS]
