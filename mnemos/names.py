"""Every NATS subject, stream, consumer, bucket and header name MNEMOS uses.

No other module writes a subject string by hand: they all ask a :class:`Names`.
The prefix (``mnemos`` by default) is the namespace, so tests and tenants that
share one NATS server stay apart (``t3f9a_jobs`` instead of ``mnemos_jobs``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = [
    "Names",
    "PRIORITIES",
    "RUNTIMES",
    "TEXT_RUNTIMES",
    "SERVICE_NAME",
    "SERVICE_VERSION",
    "HDR_MSG_ID",
    "HDR_SERVICE_ERROR",
    "HDR_SERVICE_ERROR_CODE",
    "HDR_MSG_TTL",
    "HDR_TENANT",
    "HDR_PING",
    "model_token",
    "model_key",
    "model_name",
    "validate_prefix",
    "validate_tenant",
    "TENANT_RE",
]

SERVICE_NAME = "mnemos-control-plane"
SERVICE_VERSION = "0.1.0"

#: Runtimes a job may name. A worker advertises the subset it can run.
RUNTIMES: tuple[str, ...] = ("vllm", "transformers", "pytorch", "python")
#: Runtimes that load the same model directories (a Hugging Face causal LM) and take text.
TEXT_RUNTIMES: tuple[str, ...] = ("transformers", "vllm")
#: Priorities, lowest to highest. 10 is served first.
PRIORITIES: tuple[int, ...] = tuple(range(1, 11))

HDR_MSG_ID = "Nats-Msg-Id"
HDR_MSG_TTL = "Nats-TTL"
HDR_SERVICE_ERROR = "Nats-Service-Error"
HDR_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
#: The tenant a request acts for (set by the HTTP gateway from the API key, or by a
#: service's client). A request with it sees and changes only that tenant's jobs.
HDR_TENANT = "Mnemos-Tenant"
#: On a request to an actor's subject: "are you there?" (answered without a call).
HDR_PING = "Mnemos-Ping"
#: On a dispatch message of revision 0 whose job has a ``reply_to``: the control plane
#: writes the job's queued record right after it (``jobs.start``), as for ``jobs.submit``,
#: instead of deferring it (``jobs.run``). The worker reads the record before claiming.
HDR_RECORD_FOLLOWS = "Mnemos-Record-Follows"

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


#: A tenant's name: one subject token (``mnemos.tenant.<tenant>.api.*``) and a KV key.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it can name a tenant's subjects, else raise ValueError."""
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 characters of A-Z, a-z, 0-9, _ and -, "
                         "starting with a letter or digit")
    return tenant


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can name subjects, buckets and streams, else raise ValueError."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"namespace {prefix!r} must be 1-32 chars of a-z, 0-9 and _, starting with a letter"
        )
    return prefix


def model_key(family: str, version: str) -> str:
    """KV key of a model record: ``<family>.<version>`` (readable with ``nats kv get``)."""
    return f"{family}.{version}"


def model_name(family: str, version: str) -> str:
    """The user-facing model name, ``family:version``."""
    return f"{family}:{version}"


def model_token(family: str, version: str) -> str:
    """One subject token for a model: ``family:version`` with the version's dots as ``_``.

    Families have no ``:`` or ``.`` and versions have no ``_`` (see ``messages.ModelRef``),
    so the token maps back to exactly one model.
    """
    return f"{family}:{version.replace('.', '_')}"


@dataclass(frozen=True, slots=True)
class Names:
    """Names for one namespace."""

    prefix: str = "mnemos"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # -- KV buckets and object store -------------------------------------------------
    @property
    def jobs_bucket(self) -> str:
        return f"{self.prefix}_jobs"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}_workers"

    @property
    def models_bucket(self) -> str:
        return f"{self.prefix}_models"

    @property
    def idempotency_bucket(self) -> str:
        return f"{self.prefix}_idempotency"

    @property
    def pools_bucket(self) -> str:
        """Autoscaler pools: key ``<pool name>``, value a ``PoolSpec``."""
        return f"{self.prefix}_pools"

    @property
    def tenants_bucket(self) -> str:
        """Tenants' quotas: key ``<tenant>``, value a ``TenantQuota``."""
        return f"{self.prefix}_tenants"

    @property
    def apps_bucket(self) -> str:
        """Deployed apps: key ``<app name>``, value an ``AppRecord`` (its live version)."""
        return f"{self.prefix}_apps"

    @staticmethod
    def app_pool(app: str) -> str:
        """The autoscaler pool ``mnemos deploy`` keeps for an app's calls."""
        return f"app-{app}"

    @property
    def actors_bucket(self) -> str:
        """Actors: ``act.<token>`` their live activation, ``state.<token>`` their checkpoint."""
        return f"{self.prefix}_actors"

    @staticmethod
    def actor_token(app: str, cls: str, key: str) -> str:
        """One subject token and KV key part per actor (its key may hold any character)."""
        return hashlib.sha256(f"{app}\x00{cls}\x00{key}".encode()).hexdigest()[:32]

    @staticmethod
    def actor_activation_key(token: str) -> str:
        return f"act.{token}"

    @staticmethod
    def actor_state_key(token: str) -> str:
        return f"state.{token}"

    def actor_subject(self, token: str) -> str:
        """Core subject the activation's process answers calls on (no JetStream)."""
        return f"{self.prefix}.actor.{token}"

    @property
    def actor_activate_subject(self) -> str:
        """Workers (one per request, by queue group) activate actors asked for here."""
        return f"{self.prefix}.actors.activate"

    def worker_actors_subject(self, worker_id: str) -> str:
        """A worker answers here whether it hosts (or is activating) an actor token."""
        return f"{self.prefix}.worker.{worker_id}.actors"

    @property
    def actors_queue_group(self) -> str:
        return f"{self.prefix}-actors"

    @property
    def autoscaler_bucket(self) -> str:
        """The autoscaler's state: its leader lease and each pool's status."""
        return f"{self.prefix}_autoscaler"

    #: Key of the autoscaler's leader lease in :attr:`autoscaler_bucket`.
    AUTOSCALER_LEASE_KEY = "leader"

    @staticmethod
    def pool_status_key(pool: str) -> str:
        """Key of a pool's status in :attr:`autoscaler_bucket`."""
        return f"status.{pool}"

    @property
    def artifacts_bucket(self) -> str:
        return f"{self.prefix}_artifacts"

    # -- streams ---------------------------------------------------------------------
    @property
    def dispatch_stream(self) -> str:
        return f"{self.prefix.upper()}_DISPATCH"

    @property
    def results_stream(self) -> str:
        return f"{self.prefix.upper()}_RESULTS"

    # -- dispatch ----------------------------------------------------------------------
    @property
    def dispatch_all(self) -> str:
        return f"{self.prefix}.dispatch.>"

    def dispatch_subject(self, runtime: str, priority: int, family: str, version: str) -> str:
        return f"{self.prefix}.dispatch.{runtime}.{priority}.{model_token(family, version)}"

    def dispatch_filter(self, runtime: str, priority: int | None = None, model: str | None = None) -> str:
        """Filter for one runtime (all priorities), one runtime and priority, or exactly one
        (runtime, priority, model token) subject."""
        if priority is None:
            return f"{self.prefix}.dispatch.{runtime}.>"
        if model is None:
            return f"{self.prefix}.dispatch.{runtime}.{priority}.>"
        return f"{self.prefix}.dispatch.{runtime}.{priority}.{model}"

    def ready_subject(self, runtime: str, priority: int, model: str) -> str:
        """Core subject that rings idle workers' doorbells for a level (runtime, priority,
        model token) without queueing a job (a job nak'ed with a delay becomes available
        again)."""
        return f"{self.prefix}.ready.{runtime}.{priority}.{model}"

    def ready_filter(self, runtime: str) -> str:
        return f"{self.prefix}.ready.{runtime}.>"

    def dispatch_consumer(self, runtime: str, priority: int, model: str) -> str:
        """Durable pull consumer shared by every worker of ``runtime`` for one priority and
        one model (its subject token, e.g. ``demo-gpt2:v1``): workers pull the models they
        hold first (``neuron_runtime.affinity``)."""
        return f"{self.prefix}-{runtime}-p{priority:02d}-{model}"

    def legacy_dispatch_consumer(self, runtime: str, priority: int) -> str:
        """The consumer of one runtime and priority, for all models, of releases before
        per-model consumers (its filter overlaps theirs: workers delete it)."""
        return f"{self.prefix}-{runtime}-p{priority:02d}"

    @staticmethod
    def parse_dispatch_model(subject: str) -> tuple[str, int, str]:
        """``(runtime, priority, "family:version")`` of a dispatch subject (ValueError or
        IndexError if it is not one): the inverse of :meth:`dispatch_subject`."""
        parts = subject.split(".")
        if len(parts) != 5:
            raise ValueError(f"not a dispatch subject: {subject!r}")
        family, _, version = parts[4].partition(":")
        return parts[2], int(parts[3]), model_name(family, version.replace("_", "."))

    @staticmethod
    def parse_dispatch_subject(subject: str) -> tuple[str, int, str]:
        """``(runtime, priority, model token)`` of a dispatch or ready subject (ValueError or
        IndexError if it is not one)."""
        parts = subject.split(".")
        if len(parts) != 5:
            raise ValueError(f"not a dispatch subject: {subject!r}")
        return parts[2], int(parts[3]), parts[4]

    @staticmethod
    def token_model(token: str) -> str:
        """``family:version`` of a model subject token (the inverse of :func:`model_token`)."""
        family, _, version = token.partition(":")
        return model_name(family, version.replace("_", "."))

    # -- results -----------------------------------------------------------------------
    @property
    def results_all(self) -> str:
        return f"{self.prefix}.results.>"

    def results_subject(self, job_id: str) -> str:
        return f"{self.prefix}.results.{job_id}"

    # -- core subjects -----------------------------------------------------------------
    @property
    def api_prefix(self) -> str:
        return f"{self.prefix}.api"

    def tenant_api_subject(self, tenant: str, endpoint: str) -> str:
        """``mnemos.tenant.acme.api.jobs.submit``: ``endpoint`` for ``tenant``, where NATS
        permissions can hold a tenant's credentials to its own subjects."""
        return f"{self.prefix}.tenant.{validate_tenant(tenant)}.api.{endpoint}"

    def tenant_api_all(self, tenant: str = "*", endpoint: str = ">") -> str:
        """A filter of tenants' API subjects: every endpoint (or ``endpoint``) of ``tenant``
        (default: of every tenant)."""
        return f"{self.prefix}.tenant.{tenant}.api.{endpoint}"

    @staticmethod
    def parse_tenant_api_subject(subject: str) -> tuple[str, str] | None:
        """``(tenant, endpoint)`` of a tenant's API subject; None for any other subject."""
        parts = subject.split(".")
        if len(parts) == 6 and parts[1] == "tenant" and parts[3] == "api":
            return parts[2], f"{parts[4]}.{parts[5]}"
        return None

    def api_subject(self, endpoint: str) -> str:
        """``mnemos.api.jobs.submit`` for endpoint ``jobs.submit``."""
        return f"{self.prefix}.api.{endpoint}"

    @property
    def heartbeat_all(self) -> str:
        return f"{self.prefix}.heartbeat.*"

    def heartbeat_subject(self, worker_id: str) -> str:
        return f"{self.prefix}.heartbeat.{worker_id}"

    def cancel_subject(self, job_id: str) -> str:
        return f"{self.prefix}.cancel.{job_id}"

    @property
    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.*"

    def worker_control_subject(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{worker_id}.control"

    @property
    def api_queue_group(self) -> str:
        return f"{self.prefix}-control-plane"

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The stream that holds a KV bucket."""
        return f"KV_{bucket}"

    @staticmethod
    def kv_key_subject(bucket: str, key: str) -> str:
        """Raw subject of a KV key (used to publish with per-message headers such as TTL)."""
        return f"$KV.{bucket}.{key}"

    def stream_info_subject(self, stream: str) -> str:
        return f"$JS.API.STREAM.INFO.{stream}"

    def consumer_next_subject(self, stream: str, consumer: str) -> str:
        return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
