"""What each MNEMOS role may publish and subscribe to on NATS: the one place that says so.

Built from :class:`~mnemos.names.Names`, so a namespace's users reach only that
namespace. The lists come from tracing every component on a real server (each PUB, SUB
and JetStream API call of a full run: the job paths, streaming, apps, actors, pools,
deploys, draining) and are proven by ``tests/test_auth.py`` against nats-server itself.

Roles:

- ``control-plane``: owns the namespace (creates the layout, answers ``<ns>.api.>``,
  writes job records, dispatches, cancels). Trusted with the namespace's JetStream API.
- ``autoscaler``: reads the queues, pools and workers; writes only its own bucket; asks
  workers to drain.
- ``worker`` (and the app processes it starts, which run user code): pulls dispatch
  messages, writes job and worker records and results, hosts actors, reads models. It
  cannot call the API (submit, cancel, deploy, pools), push models, create streams other
  than the two job streams (an idempotent create of an existing stream changes nothing),
  delete or purge anything, or subscribe to results.
- ``gateway``: calls the API for the tenants its API keys name, reads results.
- ``service``: an SDK user: the job, model, app and actor endpoints and results; not the
  operator's endpoints (pools, quotas, deploys). A tenant's service user
  (``service.<tenant>``, ``mnemos auth mint service --name service.acme``) calls only its
  tenant's subjects, ``<ns>.tenant.<tenant>.api.*``: the tenant is the subject's, and no
  header can make it another's.
- ``deploy``: pushes models and artifacts and deploys apps.
- ``operator``: everything (the ``nats`` CLI, ``mnemos`` admin commands).

Every user subscribes to replies only under its own inbox prefix
(:func:`mnemos.auth.inbox_prefix`). Roles that answer requests (the control plane, and
workers, which answer ``jobs.run`` and ``jobs.start`` when the job ends, and actor calls)
may publish to any ``_INBOX.>`` subject; no one else may.
"""

from __future__ import annotations

from mnemos.auth import Permissions, inbox_prefix
from mnemos.names import Names

__all__ = ["ROLES", "role_permissions", "local_users"]

ROLES: tuple[str, ...] = ("control-plane", "autoscaler", "worker", "gateway", "service", "deploy", "operator")

#: The API endpoints an SDK user (``service``) may call: jobs, and reading models, apps,
#: actors, workers and pools. Changing pools and deploying apps are the operator's.
_SERVICE_ENDPOINTS = (
    "jobs.submit", "jobs.run", "jobs.start", "jobs.get", "jobs.list", "jobs.cancel", "jobs.retry",
    "models.list", "models.get", "apps.list", "apps.get", "actors.list", "workers.list", "pools.list", "pools.get",
    "tenants.get", "tenants.list",
)


def _js(names: Names) -> dict[str, str]:
    """The namespace's JetStream stream names by what they hold."""
    kv = {bucket: Names.kv_stream(bucket) for bucket in (
        names.jobs_bucket, names.workers_bucket, names.models_bucket, names.idempotency_bucket, names.pools_bucket,
        names.apps_bucket, names.actors_bucket, names.autoscaler_bucket, names.tenants_bucket)}
    return {"dispatch": names.dispatch_stream, "results": names.results_stream,
            "artifacts": f"OBJ_{names.artifacts_bucket}", **kv}


def _api(op: str, *streams: str) -> tuple[str, ...]:
    """``$JS.API.<op>.<stream>`` and everything under it (consumer names, subjects) for
    each stream."""
    return tuple(s for stream in streams for s in (f"$JS.API.{op}.{stream}", f"$JS.API.{op}.{stream}.>"))


def _watch(*streams: str) -> tuple[str, ...]:
    """What reading a bucket or stream with an ephemeral consumer (a KV watch, an ordered
    consumer) takes: create it, ask its info, delete it."""
    return _api("CONSUMER.CREATE", *streams) + _api("CONSUMER.INFO", *streams) + _api("CONSUMER.DELETE", *streams)


def _read(*streams: str) -> tuple[str, ...]:
    """Reading single messages (KV gets; direct or from the leader) and stream info."""
    return _info(*streams) + _api("DIRECT.GET", *streams) + _api("STREAM.MSG.GET", *streams)


def _info(*streams: str) -> tuple[str, ...]:
    """Stream info (binding a bucket, checking the layout) of each stream."""
    return tuple(f"$JS.API.STREAM.INFO.{stream}" for stream in streams)


def role_permissions(role: str, names: Names, user: str | None = None) -> Permissions:
    """The permissions of ``role`` in the namespace of ``names`` for the user named
    ``user`` (default: the role's name; it sets the inbox prefix)."""
    ns, s = names.prefix, _js(names)
    inbox = f"{inbox_prefix(user or role)}.>"
    kv = names.kv_key_subject
    all_streams = tuple(s.values())
    if role == "operator":
        return Permissions(pub_allow=(">",), sub_allow=(">",))
    if role == "control-plane":
        return Permissions(
            pub_allow=(f"{ns}.>", "$JS.API.>", f"$JS.ACK.{s['dispatch']}.>", "_INBOX.>", "$SRV.>",
                       *(kv(b, ">") for b in (names.jobs_bucket, names.idempotency_bucket, names.pools_bucket,
                                              names.apps_bucket, names.actors_bucket, names.workers_bucket,
                                              names.tenants_bucket))),
            sub_allow=(f"{ns}.>", "$SRV.>", inbox),
        )
    if role == "autoscaler":
        return Permissions(
            pub_allow=(kv(names.autoscaler_bucket, ">"), names.worker_control_subject("*"),
                       *_api("STREAM.CREATE", s["dispatch"], s["results"]), *_info(*all_streams),
                       *_read(Names.kv_stream(names.autoscaler_bucket)),
                       *_watch(Names.kv_stream(names.autoscaler_bucket), Names.kv_stream(names.pools_bucket),
                               Names.kv_stream(names.workers_bucket))),
            sub_allow=(inbox,),
        )
    if role == "worker":
        dispatch = s["dispatch"]
        return Permissions(
            pub_allow=(
                names.results_all, names.heartbeat_all, f"{ns}.ready.>", names.worker_actors_subject("*"),
                kv(names.jobs_bucket, "*"), kv(names.workers_bucket, "*"), kv(names.actors_bucket, ">"),
                f"$JS.ACK.{dispatch}.>", "_INBOX.>",
                *_api("STREAM.CREATE", dispatch, s["results"]), *_info(*all_streams),
                *_read(*(Names.kv_stream(b) for b in (names.jobs_bucket, names.actors_bucket, names.apps_bucket,
                                                     names.models_bucket)), s["results"], s["artifacts"]),
                f"$JS.API.CONSUMER.CREATE.{dispatch}.*.{ns}.dispatch.>", *_api("CONSUMER.INFO", dispatch),
                *_api("CONSUMER.DELETE", dispatch), *_api("CONSUMER.MSG.NEXT", dispatch),
                *_watch(Names.kv_stream(names.models_bucket), Names.kv_stream(names.workers_bucket), s["artifacts"]),
                "$JS.API.STREAM.NAMES",
            ),
            sub_allow=(
                f"{ns}.dispatch.>", f"{ns}.ready.>", names.cancel_all, names.heartbeat_all,
                names.actor_activate_subject, names.worker_control_subject("*"), names.worker_actors_subject("*"),
                names.actor_subject("*"), inbox,
            ),
        )
    if role in ("gateway", "service"):
        tenant = (user or role).partition(".")[2]
        if role == "gateway":  # acts for the tenant of each API key, and as the operator for operator keys
            endpoints: tuple[str, ...] = (f"{ns}.api.>", names.tenant_api_all())
        elif tenant:  # a tenant's user: only that tenant's subjects, where the tenant is the server's to check
            endpoints = tuple(names.tenant_api_subject(tenant, e) for e in _SERVICE_ENDPOINTS)
        else:  # ``mnemos up``'s service user: the service endpoints, for every tenant
            endpoints = (*(names.api_subject(e) for e in _SERVICE_ENDPOINTS),
                         *(names.tenant_api_all(endpoint=e) for e in _SERVICE_ENDPOINTS))
        return Permissions(
            pub_allow=(*endpoints, "$SRV.PING.>", names.actor_subject("*"), names.actor_activate_subject,
                       *_watch(s["results"]), *_read(s["results"])),
            sub_allow=(names.results_all, inbox),
        )
    if role == "deploy":
        models = Names.kv_stream(names.models_bucket)
        return Permissions(
            pub_allow=(names.api_subject("apps.deploy"), names.api_subject("apps.get"),
                       names.api_subject("models.get"), names.api_subject("models.list"),
                       kv(names.models_bucket, ">"), f"$O.{names.artifacts_bucket}.>", "$JS.API.INFO",
                       *_api("STREAM.CREATE", s["artifacts"]), *_read(s["artifacts"], models),
                       *_watch(s["artifacts"], models)),
            sub_allow=(inbox,),
        )
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def local_users(names: Names) -> dict[str, Permissions]:
    """The users ``mnemos up`` mints: one per role (the service user is ``service``)."""
    return {role: role_permissions(role, names) for role in ROLES}
