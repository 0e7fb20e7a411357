"""Ops with the `nats` CLI: what docs/operations.md tells an operator to type works and reads well.

The `nats` binary (natscli, Go) cannot be installed here, so :class:`NatsCli` sends, with
nats-py, the requests each documented command sends, and the tests read the replies the way
the command (and the operator) would. Request shapes, from the natscli / jsm.go / nats.go
sources:

- ``nats micro ls|info|stats`` (natscli ``cli/micro_command.go``, ``cli/util.go``
  ``doReqAsync``): body ``{}`` with header ``Accept-Encoding: snappy`` to a fresh inbox on
  ``$SRV.INFO[.<name>]`` / ``$SRV.STATS.<name>``; ``ls`` and ``stats`` gather replies until
  300 ms pass without one, ``info`` takes the first reply and then asks
  ``$SRV.STATS.<name>.<id>``. Every reply is validated against its micro JSON schema
  (jsm.go ``api.ParseAndValidateMessage``, santhosh-tekuri/jsonschema: draft-07, formats
  checked); one invalid reply fails the whole command.
- ``nats req`` (``cli/req_command.go``): the body as typed, one reply within ``--timeout``.
- ``nats kv get`` (``cli/kv_command.go``, nats.go ``jetstream/kv.go`` and ``stream.go``
  ``getMsg``): ``$JS.API.STREAM.INFO.KV_<bucket>``, then ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``
  when the stream allows direct gets, else ``$JS.API.STREAM.MSG.GET.KV_<bucket>`` with
  ``{"last_by_subj": ...}``. ``nats kv watch`` / ``kv ls <bucket>``: an ordered consumer on
  ``$KV.<bucket>.<key or >>`` delivering the last message per subject (headers only for
  ``ls``). ``nats kv ls``: ``$JS.API.STREAM.LIST`` pages, streams named ``KV_*``.
- ``nats object ls`` (nats.go ``jetstream/object.go`` ``List``): an ordered consumer on
  ``$O.<bucket>.M.>``, last per subject; ``nats object info`` (``GetInfo``): the last message
  on ``$O.<bucket>.M.<base64url name>``, fetched like a KV value.
- ``nats stream ls|info|subjects`` (``cli/stream_command.go``, jsm.go): ``STREAM.LIST`` pages
  without internal ``KV_``/``OBJ_`` streams, ``STREAM.INFO.<name>``, ``STREAM.INFO`` with
  ``subjects_filter``. ``nats stream view`` (jsm.go ``stream_pager.go``): on a work-queue
  stream ``$JS.API.DIRECT.GET.<stream>`` with ``{"seq": n, "next_by_subj": filter}``; on
  other streams a durable pull consumer (memory, R1, ack explicit, filter) fetched with
  ``{"batch": n, "no_wait": true}``, acked and deleted afterwards.
- ``nats consumer ls|info`` (jsm.go ``Consumers``, nats.go ``apiConsumerInfoT``):
  ``$JS.API.CONSUMER.LIST.<stream>`` pages, ``$JS.API.CONSUMER.INFO.<stream>.<consumer>``.
- ``nats sub`` (``cli/sub_command.go``): a core subscription; with ``--all`` a JetStream
  push consumer (ack none, flow control, deliver all), here nats-py's ordered consumer.

Not read in the sources, assumed standard: the subject jsm.go creates the pager's consumer
on (``$JS.API.CONSUMER.CREATE.<stream>.<name>`` here) and the ``{"offset": n}`` body of its
``STREAM.LIST`` pages (read for ``CONSUMER.LIST``). Deliberate differences: natscli's
work-queue pager advances its direct-get sequence by one per request (it can show a message
twice when the queue has gaps), this one moves past the message it got; nats-py's ordered
consumer stands in for nats.go's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import shlex
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, get_args

import jsonschema
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as jsapi

from control_plane.autoscaler import Autoscaler, AutoscalerSettings
from mnemos.connection import barrier
from mnemos.client import job_spec
from mnemos.config import NatsSettings
from mnemos.endpoints import ENDPOINTS
from mnemos.messages import (
    CancelJob,
    Dispatch,
    JobRecord,
    JobSpec,
    JobStatus,
    LeaseRecord,
    ModelRecord,
    PoolSpec,
    PoolStatus,
    ResultChunk,
    ResultFinal,
    ResultMessage,
    RetryPolicy,
    WorkerCommand,
    WorkerRecord,
    decode,
    encode,
)
from mnemos.names import (
    HDR_SERVICE_ERROR,
    PRIORITIES,
    RUNTIMES,
    SERVICE_NAME,
    Names,
    model_key,
    model_token,
)
from registry.demo import DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION, DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION
from tests.conftest import assert_eventually, drop_namespace

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "nats-micro-schemas"

#: Placeholders the doc uses for ids.
JOB, WORKER = "<job_id>", "<worker_id>"
#: The pool the doc's commands read (the one `mnemos up` writes).
POOL = "local"

#: What each API endpoint takes and answers.
REQUEST_TYPES: dict[str, Any] = {e.name: e.request for e in ENDPOINTS}
REPLY_TYPES: dict[str, Any] = {e.name: e.reply for e in ENDPOINTS}
RESULT = ResultMessage


# ----------------------------------------------------------------------------- the nats CLI


class JsApiError(Exception):
    """An ``{"error": ...}`` reply of the JetStream API (what natscli prints as the error)."""


@functools.cache
def _micro_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not SCHEMAS.exists():
        pytest.skip(f"{SCHEMAS} not found (shared/ is beside the repository in CI)")
    validators = {}
    for path in SCHEMAS.glob("*_response.json"):
        schema = json.loads(path.read_text())
        validators[schema["title"]] = jsonschema.Draft7Validator(
            schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
        )
    return validators


class NatsCli:
    """The requests the `nats` CLI sends for the commands in docs/operations.md."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    # -- request/reply (natscli util.go doReqAsync, req_command.go) ---------------------------
    async def _collect(
        self, subject: str, body: bytes, *, wait: int, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> list[Msg]:
        """Publish with a fresh inbox; ``wait`` replies, or (0) every reply until 300 ms pass
        without one. The first reply may take the whole ``timeout``."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[Msg] = []
        deadline = time.monotonic() + timeout
        try:
            await self.nc.publish(subject, body, reply=inbox, headers=headers)
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=min(remaining, 0.3) if replies else remaining)
                except nats.errors.TimeoutError:
                    break
                if msg.headers and msg.headers.get("Status") == "503":
                    raise nats.errors.NoRespondersError
                replies.append(msg)
                if wait and len(replies) == wait:
                    break
        finally:
            await sub.unsubscribe()
        return replies

    async def req(self, subject: str, body: str, timeout: float = 5.0) -> Msg:
        """``nats req SUBJECT BODY``."""
        replies = await self._collect(subject, body.encode(), wait=1, timeout=timeout)
        assert replies, f"nats req {subject}: no reply within {timeout}s"
        return replies[0]

    # -- micro services ------------------------------------------------------------------------
    async def _micro(self, verb: str, *path: str, wait: int) -> list[dict[str, Any]]:
        subject = ".".join(("$SRV", verb, *path))
        msgs = await self._collect(subject, b"{}", wait=wait, headers={"Accept-Encoding": "snappy"})
        return [self._validated(json.loads(m.data), f"io.nats.micro.v1.{verb.lower()}_response") for m in msgs]

    @staticmethod
    def _validated(body: dict[str, Any], expected_type: str) -> dict[str, Any]:
        assert body.get("type") == expected_type, f"invalid response type {body.get('type')}"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _micro_validators()[expected_type].iter_errors(body)]
        assert not errors, f"{expected_type} fails its schema: {errors}"
        return body

    async def micro_ls(self, service: str = "") -> list[dict[str, Any]]:
        return await self._micro("INFO", *filter(None, [service]), wait=0)

    async def micro_info(self, service: str, instance: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
        [info] = await self._micro("INFO", *filter(None, [service, instance]), wait=1)
        [stats] = await self._micro("STATS", info["name"], info["id"], wait=1)
        return info, stats

    async def micro_stats(self, service: str) -> list[dict[str, Any]]:
        return await self._micro("STATS", service, wait=0)

    # -- JetStream API ---------------------------------------------------------------------------
    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.nc.request(subject, b"" if body is None else json.dumps(body).encode(), timeout=5)
        data: dict[str, Any] = json.loads(reply.data)
        if "error" in data:
            raise JsApiError(data["error"])
        return data

    async def _pages(self, subject: str, key: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = await self.api(subject, {"offset": len(items)})
            items += page.get(key) or []
            if not page.get(key) or len(items) >= page["total"]:
                return items

    async def stream_ls(self, *, all: bool = False) -> list[str]:  # noqa: A002 - the flag's name
        names = [s["config"]["name"] for s in await self._pages("$JS.API.STREAM.LIST", "streams")]
        return [n for n in names if all or not n.startswith(("KV_", "OBJ_", "$MQTT_"))]

    async def stream_info(self, stream: str) -> dict[str, Any]:
        return await self.api(f"$JS.API.STREAM.INFO.{stream}")

    async def stream_subjects(self, stream: str, subject_filter: str = ">") -> dict[str, int]:
        subjects: dict[str, int] = {}
        while True:
            info = await self.api(f"$JS.API.STREAM.INFO.{stream}",
                                  {"subjects_filter": subject_filter, "offset": len(subjects)})
            page = info["state"].get("subjects") or {}
            subjects |= page
            if not page or len(subjects) >= info.get("total", 0):
                return subjects

    async def stream_view(self, stream: str, subject: str = ">", limit: int = 100) -> list[tuple[int, str, bytes]]:
        """``nats stream view STREAM [--subject S]``: (sequence, subject, data) per message."""
        info = await self.stream_info(stream)
        if info["config"]["retention"] == "workqueue":
            assert info["config"].get("allow_direct"), "natscli pages a work-queue stream only with direct gets"
            return await self._view_direct(stream, subject, info["state"]["first_seq"], limit)
        return await self._view_consumer(stream, subject, limit)

    async def _view_direct(self, stream: str, subject: str, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        seen: list[tuple[int, str, bytes]] = []
        while len(seen) < limit:
            body = json.dumps({"seq": seq, "next_by_subj": subject}).encode()
            reply = await self.nc.request(f"$JS.API.DIRECT.GET.{stream}", body, timeout=5)
            headers = reply.headers or {}
            if headers.get("Status") in ("404", "408"):
                break
            got = int(headers["Nats-Sequence"])
            seen.append((got, headers["Nats-Subject"], reply.data))
            seq = got + 1
        return seen

    async def _view_consumer(self, stream: str, subject: str, limit: int) -> list[tuple[int, str, bytes]]:
        name = f"stream_pager_{os.getpid()}{time.time_ns()}"
        config = {"durable_name": name, "description": "JSM Stream Pager", "deliver_policy": "all",
                  "ack_policy": "explicit", "filter_subject": subject, "inactive_threshold": 3600 * 10**9,
                  "mem_storage": True, "num_replicas": 1}
        await self.api(f"$JS.API.CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config})
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        seen: list[tuple[int, str, bytes]] = []
        try:
            while len(seen) < limit:  # a page of 10; the end of the data is a 404 (or 408) status
                await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                                      json.dumps({"batch": 10, "no_wait": True}).encode(), reply=inbox)
                for _ in range(10):
                    msg = await sub.next_msg(timeout=5)
                    if msg.headers and msg.headers.get("Status") in ("404", "408"):
                        return seen
                    await msg.ack()
                    seen.append((msg.metadata.sequence.stream, msg.subject, msg.data))
            return seen
        finally:
            await sub.unsubscribe()
            await self.api(f"$JS.API.CONSUMER.DELETE.{stream}.{name}")

    async def consumer_ls(self, stream: str) -> list[dict[str, Any]]:
        return await self._pages(f"$JS.API.CONSUMER.LIST.{stream}", "consumers")

    async def consumer_info(self, stream: str, consumer: str) -> dict[str, Any]:
        return await self.api(f"$JS.API.CONSUMER.INFO.{stream}.{consumer}")

    # -- key-value and object store ----------------------------------------------------------------
    async def kv_ls(self) -> list[str]:
        return [n.removeprefix("KV_") for n in await self.stream_ls(all=True) if n.startswith("KV_")]

    async def _kv_stream(self, bucket: str) -> dict[str, Any]:
        info = await self.stream_info(f"KV_{bucket}")
        assert info["config"]["max_msgs_per_subject"] >= 1, f"{bucket} is not a KV bucket to the nats CLI"
        return info

    async def _last_for(self, stream: str, subject: str, *, direct: bool) -> tuple[dict[str, str], bytes]:
        """nats.go ``GetLastMsgForSubject``: (headers, data); KeyError if there is none."""
        if direct:
            reply = await self.nc.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", timeout=5)
            if (reply.headers or {}).get("Status") == "404":
                raise KeyError(subject)
            return reply.headers or {}, reply.data
        try:
            msg = (await self.api(f"$JS.API.STREAM.MSG.GET.{stream}", {"last_by_subj": subject}))["message"]
        except JsApiError as e:
            raise KeyError(subject) from e
        raw = base64.b64decode(msg.get("hdrs", "")).decode()
        headers = dict(line.split(": ", 1) for line in raw.split("\r\n")[1:] if ": " in line)
        return headers, base64.b64decode(msg.get("data", ""))

    async def kv_get(self, bucket: str, key: str, *, direct: bool | None = None) -> bytes:
        """``nats kv get BUCKET KEY --raw``: the value's bytes (KeyError if there is none)."""
        info = await self._kv_stream(bucket)
        if direct is None:
            direct = info["config"].get("allow_direct", False)
        headers, data = await self._last_for(f"KV_{bucket}", f"$KV.{bucket}.{key}", direct=direct)
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            raise KeyError(key)
        return data

    @asynccontextmanager
    async def _last_per_subject(self, stream: str, subject: str, *, headers_only: bool = False) -> AsyncIterator[Any]:
        sub = await self.js.subscribe(subject, stream=stream, ordered_consumer=True, headers_only=headers_only,
                                      deliver_policy=jsapi.DeliverPolicy.LAST_PER_SUBJECT)
        try:
            yield sub
        finally:
            await sub.unsubscribe()

    async def _initial(self, stream: str, subject: str, *, headers_only: bool = False) -> list[Msg]:
        """The last message of each subject, read until the consumer has none pending.

        As nats.go's watcher (``InitialConsumerPending``), "none at all" is read from the
        consumer's create response: a later ``CONSUMER.INFO`` can report nothing pending and
        nothing delivered while a subject's last message is being replaced, and then deliver
        it (seen about once in 400 reads of a key rewritten every 2 ms)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        config = jsapi.ConsumerConfig(
            deliver_subject=inbox, deliver_policy=jsapi.DeliverPolicy.LAST_PER_SUBJECT, filter_subject=subject,
            ack_policy=jsapi.AckPolicy.NONE, headers_only=headers_only, mem_storage=True, num_replicas=1,
            inactive_threshold=5.0)
        created = await self.js.add_consumer(stream, config=config)
        try:
            if created.num_pending == 0:
                return []
            msgs = []
            while True:
                msg = await sub.next_msg(timeout=5)
                msgs.append(msg)
                if msg.metadata.num_pending == 0:
                    return msgs
        finally:
            await sub.unsubscribe()
            await self.js.delete_consumer(stream, created.name)

    async def kv_keys(self, bucket: str) -> list[str]:
        """``nats kv ls BUCKET``."""
        await self._kv_stream(bucket)
        msgs = await self._initial(f"KV_{bucket}", f"$KV.{bucket}.>", headers_only=True)
        return [m.subject.removeprefix(f"$KV.{bucket}.") for m in msgs
                if (m.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")]

    @asynccontextmanager
    async def kv_watch(self, bucket: str, key: str = ">") -> AsyncIterator[Any]:
        """``nats kv watch BUCKET [KEY]``: a subscription yielding the current values, then updates."""
        await self._kv_stream(bucket)
        async with self._last_per_subject(f"KV_{bucket}", f"$KV.{bucket}.{key}") as sub:
            yield sub

    async def object_ls(self, bucket: str) -> list[dict[str, Any]]:
        """``nats object ls BUCKET``: the object infos."""
        msgs = await self._initial(f"OBJ_{bucket}", f"$O.{bucket}.M.>")
        infos = [json.loads(m.data) for m in msgs]
        return [i for i in infos if not i.get("deleted")]

    async def object_info(self, bucket: str, name: str) -> dict[str, Any]:
        """``nats object info BUCKET NAME``."""
        info = await self.stream_info(f"OBJ_{bucket}")
        subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        _, data = await self._last_for(f"OBJ_{bucket}", subject, direct=info["config"].get("allow_direct", False))
        return json.loads(data)  # type: ignore[no-any-return]

    # -- subscriptions -------------------------------------------------------------------------------
    @asynccontextmanager
    async def sub(self, subject: str, *, all: bool = False) -> AsyncIterator[Any]:  # noqa: A002
        """``nats sub SUBJECT [--all]``."""
        if all:
            s = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=jsapi.DeliverPolicy.ALL)
        else:
            s = await self.nc.subscribe(subject)
            await barrier(self.nc)
        try:
            yield s
        finally:
            await s.unsubscribe()


@pytest.fixture
def cli(nc: NATS) -> NatsCli:
    return NatsCli(nc)


# ----------------------------------------------------------------------------- the doc


def doc_commands() -> list[list[str]]:
    """Every ``nats ...`` line of the doc's shell blocks, as argv without ``nats`` and comments."""
    text = DOC.read_text()
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["nats"]:
                commands.append(argv[1:])
    return commands


def doc_table(header: str) -> list[list[str]]:
    """The body rows of the doc's table whose header row starts with ``header``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def name_catalog(n: Names) -> dict[str, str]:
    """Every name an operator types, by what it is, for one namespace."""
    names = {
        "jobs bucket": n.jobs_bucket, "workers bucket": n.workers_bucket, "models bucket": n.models_bucket,
        "idempotency bucket": n.idempotency_bucket, "artifacts bucket": n.artifacts_bucket,
        "pools bucket": n.pools_bucket, "autoscaler bucket": n.autoscaler_bucket,
        "dispatch stream": n.dispatch_stream, "results stream": n.results_stream,
        "results": n.results_all, "job results": n.results_subject(JOB), "heartbeats": n.heartbeat_all,
        "heartbeat": n.heartbeat_subject(WORKER), "worker control": n.worker_control_subject(WORKER),
        "cancel": n.cancel_subject(JOB), "api queue group": n.api_queue_group,
    }
    names |= {f"api {e.name}": e.subject(n) for e in ENDPOINTS}
    names |= {f"consumer {r} {p} {m}": n.dispatch_consumer(r, p, m) for r in RUNTIMES for p in PRIORITIES
              for m in (model_token("demo-fn", "v1"), model_token("demo-gpt2", "v1"))}
    return names


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """Positional arguments and flags (``--subject`` takes a value, the others do not)."""
    positional: list[str] = []
    flags: dict[str, str | bool] = {}
    it = iter(argv)
    for arg in it:
        if arg == "--subject":
            flags[arg] = next(it)
        elif arg.startswith("-"):
            flags[arg] = True
        else:
            positional.append(arg)
    return positional, flags


def check_documented_command(argv: list[str], n: Names) -> None:
    """Fail unless ``argv`` is a command shape the doc may show, with this namespace's names."""
    cat = name_catalog(n)
    buckets = {n.jobs_bucket, n.workers_bucket, n.models_bucket, n.idempotency_bucket, n.pools_bucket}
    keys = {n.jobs_bucket: {JOB}, n.workers_bucket: {WORKER}, n.pools_bucket: {POOL},
            n.autoscaler_bucket: {Names.AUTOSCALER_LEASE_KEY, Names.pool_status_key(POOL)},
            n.models_bucket: {model_key(DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION),
                              model_key(DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION)}}
    consumers = {v for k, v in cat.items() if k.startswith("consumer ")}
    api = {e.subject(n): e.name for e in ENDPOINTS}
    pos, flags = split_argv(argv)
    where = f"`nats {shlex.join(argv)}`"
    match pos:
        case ["micro", "ls"]:
            pass
        case ["micro", "ls" | "info" | "stats", service]:
            assert service == SERVICE_NAME, where
        case ["kv", "ls"]:
            pass
        case ["kv", "ls" | "watch", bucket]:
            assert bucket in buckets, where
        case ["kv", "get" | "watch", bucket, key]:
            assert key in keys.get(bucket, ()), f"{where}: {key} is not a key of {bucket}"
            assert pos[1] == "watch" or flags == {"--raw": True}, f"{where}: without --raw natscli cuts values"
        case ["object", "ls", bucket]:
            assert bucket == n.artifacts_bucket, where
        case ["object", "info", bucket, name]:
            assert bucket == n.artifacts_bucket and name.startswith(f"{DEMO_MODEL_FAMILY}/{DEMO_MODEL_VERSION}/"), where
        case ["stream", "ls"]:
            pass
        case ["stream", "info" | "subjects" | "view", stream]:
            assert stream in (n.dispatch_stream, n.results_stream), where
            assert flags.get("--subject", n.results_subject(JOB)) == n.results_subject(JOB), where
        case ["consumer", "ls", stream] | ["consumer", "info", stream, _]:
            assert stream == n.dispatch_stream and set(pos[3:]) <= consumers, where
        case ["sub", subject]:
            assert subject in (n.results_all, n.results_subject(JOB), n.heartbeat_all), where
            assert not flags or (flags == {"--all": True} and subject == n.results_subject(JOB)), where
        case ["req", subject, body]:
            assert "{{" not in body, f"{where}: natscli expands {{{{ }}}} templates in request bodies"
            if subject == n.worker_control_subject(WORKER):
                decode(body, WorkerCommand)
            else:
                assert subject in api, f"{where}: {subject} is no API endpoint"
                decode(body, REQUEST_TYPES[api[subject]])
        case _:
            pytest.fail(f"{where}: a command this test does not know; teach it check_documented_command")


def test_documented_commands_use_the_names_the_code_builds() -> None:
    commands = doc_commands()
    assert len(commands) > 20
    for argv in commands:
        check_documented_command(argv, Names())
    text = DOC.read_text()
    n = Names()
    stable = [n.dispatch_stream, n.results_stream, n.jobs_bucket, n.workers_bucket, n.models_bucket,
              n.idempotency_bucket, n.artifacts_bucket, SERVICE_NAME, n.api_queue_group, n.results_all,
              n.heartbeat_all, n.dispatch_consumer("python", 5, model_token("demo-fn", "v1"))]
    assert (n.dispatch_stream, n.results_stream) == ("MNEMOS_DISPATCH", "MNEMOS_RESULTS")
    assert [name for name in stable if f"`{name}`" not in text and name not in str(commands)] == []


def test_endpoint_table_is_what_nats_micro_info_shows() -> None:
    rows = {(code(name)[0], code(subject)[0]) for name, subject, _ in doc_table("| endpoint | subject |")}
    assert rows == {(e.micro_name, e.subject(Names())) for e in ENDPOINTS}


def test_namespace_table_follows_names() -> None:
    default, acme = name_catalog(Names()), name_catalog(Names("acme"))
    rows = doc_table("| default | `acme` |")
    assert len(rows) >= 5
    for left, right in rows:
        name, translated = code(left)[0], code(right)[0]
        labels = [label for label, value in default.items() if value == name]
        assert labels, f"{name} is built by no Names() method"
        assert {acme[label] for label in labels} == {translated}, name


def _unwrap(t: Any) -> Any:
    """The element of a list type, the non-None member of an optional (msgspec.inspect types)."""
    while isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.UnionType)):
        t = t.item_type if isinstance(t, msgspec.inspect.ListType) else next(
            x for x in t.types if not isinstance(x, msgspec.inspect.NoneType))
    return t


def _field_type(t: Any, name: str) -> Any:
    t = _unwrap(t)
    assert isinstance(t, msgspec.inspect.StructType), f"{name} is not inside a struct"
    return next(f.type for f in t.fields if f.name == name)


def _all_field_names(t: Any) -> set[str]:
    """Every field name inside ``t``, however deep."""
    t = _unwrap(t)
    if not isinstance(t, msgspec.inspect.StructType):
        return set()
    return {f.name for f in t.fields}.union(*(_all_field_names(f.type) for f in t.fields))


def test_job_record_table_names_real_fields() -> None:
    record = msgspec.inspect.type_info(JobRecord)
    for path_cell, meaning in doc_table("| field | meaning |"):
        [path] = code(path_cell)
        t: Any = record
        for part in path.split("."):
            t = _field_type(t, part)
        mentioned = set(code(meaning))
        if path == "status":
            assert mentioned == set(get_args(JobStatus)), "the doc lists every status"
        else:
            assert mentioned <= _all_field_names(t), f"{path}: {mentioned - _all_field_names(t)}"


def test_result_message_table_is_what_the_results_stream_holds() -> None:
    rows = {code(kind)[0]: code(fields) for kind, fields in doc_table("| message `type` | fields |")}
    types = {}
    for t in get_args(ResultMessage):
        info = msgspec.inspect.type_info(t)
        types[info.tag] = [f.name for f in info.fields]
    assert rows.keys() == types.keys()
    for kind, fields in rows.items():
        assert [f for f in dict.fromkeys(fields) if f in types[kind]] == types[kind], kind


# ----------------------------------------------------------------------------- helpers


def failing_spec() -> JobSpec:
    spec = job_spec(f"{DEMO_FUNCTIONS_FAMILY}:{DEMO_FUNCTIONS_VERSION}", function="fail", args=["disk full"])
    return msgspec.structs.replace(spec, retry_config=RetryPolicy(max_retries=0))


async def control(cli: NatsCli, names: Names, worker_id: str, command: str) -> WorkerRecord:
    reply = await cli.req(names.worker_control_subject(worker_id), json.dumps({"command": command}))
    return decode(reply.data, WorkerRecord)


async def next_json(sub: Any, timeout: float = 10.0) -> tuple[str, bytes]:
    msg = await sub.next_msg(timeout=timeout)
    return msg.subject, msg.data


# ----------------------------------------------------------------------------- the service


async def test_micro_ls_info_stats_tell_instances_and_namespaces_apart(
    control_plane: Any, cli: NatsCli, nats_settings: NatsSettings, names: Names
) -> None:
    from control_plane import ControlPlane, ControlPlaneSettings

    other_ns = NatsSettings(nats_url=nats_settings.nats_url, namespace="t" + uuid.uuid4().hex[:10])
    started = []
    for settings in (nats_settings, other_ns):  # a second instance here, one in another namespace
        conn = await nats.connect(settings.servers, name="pytest-control-plane-2")
        cp = ControlPlane(conn, settings, ControlPlaneSettings())
        await cp.start()
        started.append((cp, conn))
    try:
        ours = {control_plane.service.id, started[0][0].service.id}
        theirs = started[1][0].service.id

        listed = {i["id"]: i for i in await cli.micro_ls() if i["name"] == SERVICE_NAME}
        assert ours | {theirs} <= listed.keys()
        assert {i["metadata"]["namespace"] for k, i in listed.items() if k in ours} == {names.prefix}
        assert listed[theirs]["metadata"]["namespace"] == other_ns.names.prefix
        for instance in ours:
            info = listed[instance]
            assert info["version"] and info["description"]
            assert sorted((e["name"], e["subject"], e["queue_group"], e["metadata"]["endpoint"])
                          for e in info["endpoints"]) == sorted(
                (e.micro_name, e.subject(names), names.api_queue_group, e.name) for e in ENDPOINTS)

        info, stats = await cli.micro_info(SERVICE_NAME, theirs)
        assert info["id"] == stats["id"] == theirs
        assert {e["subject"] for e in info["endpoints"]} == {d.subject(other_ns.names) for d in ENDPOINTS}

        for _ in range(6):  # the queue group spreads them over our two instances
            await cli.req(names.api_subject("jobs.list"), "{}")
        per_instance = {s["id"]: s for s in await cli.micro_stats(SERVICE_NAME)}
        assert ours | {theirs} <= per_instance.keys()
        served = [e["num_requests"] for i in ours for e in per_instance[i]["endpoints"] if e["name"] == "jobs-list"]
        assert sum(served) == 6
    finally:
        for cp, conn in started:
            await cp.stop()
            await conn.close()
        await drop_namespace(cli.nc, other_ns.names)


# ----------------------------------------------------------------------------- records


async def test_kv_records_read_as_plain_json(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Any, cli: NatsCli, names: Names
) -> None:
    worker = await start_worker(runtimes=["python"])
    done = await client.run(job_spec("demo-fn:v1", args=["héllo wörld"]), timeout=30)
    failed = await client.run(failing_spec(), timeout=30)
    assert (done.status, failed.status) == ("completed", "failed")

    assert {names.jobs_bucket, names.workers_bucket, names.models_bucket, names.idempotency_bucket} <= set(
        await cli.kv_ls())
    assert {done.job_id, failed.job_id} <= set(await cli.kv_keys(names.jobs_bucket))
    for direct in (True, False):  # DIRECT.GET (allow_direct) and STREAM.MSG.GET read the same JSON
        raw = await cli.kv_get(names.jobs_bucket, done.job_id, direct=direct)
        assert json.loads(raw)["type"] == "io.mnemos.v1.job"
        record = decode(raw, JobRecord)
        assert record.status == "completed" and record.output.result == {"args": ["héllo wörld"], "kwargs": {}}
        assert not raw.isascii(), "this value is why the doc says --raw: natscli prints it as base64 otherwise"
    record = decode(await cli.kv_get(names.jobs_bucket, done.job_id), JobRecord)
    assert record.worker_id == worker.worker_id and record.timings.total_ms > 0
    [attempt] = record.attempts
    assert attempt.outcome == "completed" and attempt.phases[-1].name == "completed"

    record = decode(await cli.kv_get(names.jobs_bucket, failed.job_id), JobRecord)
    assert record.error.code == "execution_error" and "disk full" in record.error.message
    assert record.attempts[-1].outcome == "failed" and record.attempts[-1].error.code == "execution_error"

    with pytest.raises(KeyError):
        await cli.kv_get(names.jobs_bucket, "01JNOSUCHJOB")


async def test_kv_watch_shows_every_state_change(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Any, cli: NatsCli, names: Names
) -> None:
    worker = await start_worker(runtimes=["python"])
    await control(cli, names, worker.worker_id, "pause")  # else the worker's claim may come before `queued`
    async with cli.kv_watch(names.jobs_bucket) as watch:
        job = await client.submit(job_spec("demo-fn:v1", args=[1]))
        subject, data = await next_json(watch)
        assert decode(data, JobRecord).status == "queued"
        await control(cli, names, worker.worker_id, "resume")
        statuses = ["queued"]
        while not statuses or statuses[-1] != "completed":
            subject, data = await next_json(watch)
            assert subject == f"$KV.{names.jobs_bucket}.{job.job_id}"
            statuses.append(decode(data, JobRecord).status)
    assert set(statuses) <= {"queued", "acquired", "loading_model", "running", "streaming", "completed"}


async def test_worker_record_heartbeats_and_control(
    control_plane: Any, start_worker: Any, cli: NatsCli, names: Names
) -> None:
    worker = await start_worker(runtimes=["python"], max_concurrent_jobs=3)
    assert worker.worker_id in await cli.kv_keys(names.workers_bucket)
    record = decode(await cli.kv_get(names.workers_bucket, worker.worker_id), WorkerRecord)
    assert (record.runtimes, record.max_concurrent_jobs, record.free_slots) == (["python"], 3, 3)

    async with cli.sub(names.heartbeat_all) as heartbeats:
        subject, data = await next_json(heartbeats)
        assert subject == names.heartbeat_subject(worker.worker_id)
        assert decode(data, WorkerRecord).worker_id == worker.worker_id

        assert (await control(cli, names, worker.worker_id, "status")).status == "idle"
        assert (await control(cli, names, worker.worker_id, "pause")).status == "paused"

        async def paused_heartbeat() -> bool:
            return decode((await next_json(heartbeats))[1], WorkerRecord).status == "paused"

        await assert_eventually(paused_heartbeat, message="no heartbeat says paused")
        assert (await control(cli, names, worker.worker_id, "resume")).status == "idle"

    reply = await cli.req(names.worker_control_subject(worker.worker_id), '{"command": "reboot"}')
    assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "422"  # the one envelope
    body = json.loads(reply.data)
    assert body["type"] == "io.mnemos.v1.error" and body["error"]["code"] == "validation_error"


async def test_model_record_and_artifacts_agree(demo_fn: ModelRecord, cli: NatsCli, names: Names) -> None:
    key = model_key(demo_fn.family, demo_fn.version)
    assert key == "demo-fn.v1" and key in await cli.kv_keys(names.models_bucket)
    record = decode(await cli.kv_get(names.models_bucket, key), ModelRecord)
    objects = {o["name"]: o for o in await cli.object_ls(names.artifacts_bucket)}
    for f in record.files:
        name = f"{record.family}/{record.version}/{f.path}"
        assert objects[name] == await cli.object_info(names.artifacts_bucket, name)
        assert objects[name]["size"] == f.size
        digest = base64.urlsafe_b64decode(objects[name]["digest"].removeprefix("SHA-256="))
        assert digest.hex() == f.sha256


# ----------------------------------------------------------------------------- queue and results


async def test_queue_as_stream_and_consumer_commands_show_it(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Any, cli: NatsCli, names: Names
) -> None:
    worker = await start_worker(runtimes=["python"])
    fn = model_token("demo-fn", "v1")
    for p in (5, 9):  # a worker makes a level's consumer when it first pulls it
        assert (await client.run(job_spec("demo-fn:v1", args=["warm"], priority=p))).status == "completed"
    assert {c["name"] for c in await cli.consumer_ls(names.dispatch_stream)} == {
        names.dispatch_consumer("python", p, fn) for p in (5, 9)}
    assert {names.dispatch_stream, names.results_stream} <= set(await cli.stream_ls())
    assert not [s for s in await cli.stream_ls() if s.startswith(("KV_", "OBJ_"))]

    await control(cli, names, worker.worker_id, "pause")
    low = await client.submit(job_spec("demo-fn:v1", args=["low"], priority=5))
    high = await client.submit(job_spec("demo-fn:v1", args=["high"], priority=9))

    info = await cli.stream_info(names.dispatch_stream)
    assert info["config"]["retention"] == "workqueue" and info["state"]["messages"] == 2
    assert await cli.stream_subjects(names.dispatch_stream) == {
        names.dispatch_subject("python", p, "demo-fn", "v1"): 1 for p in (5, 9)}
    p05 = await cli.consumer_info(names.dispatch_stream, names.dispatch_consumer("python", 5, fn))
    assert p05["config"]["filter_subject"] == names.dispatch_filter("python", 5, fn)
    assert (p05["num_pending"], p05["num_ack_pending"]) == (1, 0)

    viewed = await cli.stream_view(names.dispatch_stream)
    queued = [decode(data, Dispatch).record for _, _, data in viewed]
    assert [(r.job_id, r.status) for r in queued] == [(low.job_id, "queued"), (high.job_id, "queued")]
    assert (await cli.stream_info(names.dispatch_stream))["state"]["messages"] == 2, "viewing took a job"

    await control(cli, names, worker.worker_id, "resume")
    for job in (low, high):
        assert (await client.wait(job.job_id, timeout=30)).status == "completed"

    async def drained() -> bool:
        return (await cli.stream_info(names.dispatch_stream))["state"]["messages"] == 0

    await assert_eventually(drained, message="dispatch stream still holds finished jobs")


async def test_results_as_stream_view_and_sub_show_them(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Any, cli: NatsCli, names: Names
) -> None:
    await start_worker(runtimes=["python"])
    async with cli.sub(names.results_all) as live:
        job = await client.run(job_spec("demo-fn:v1", function="stream_words", args=["one two"]), timeout=30)
        subject, data = await next_json(live)
        assert subject == names.results_subject(job.job_id) and decode(data, RESULT).job_id == job.job_id

    viewed = await cli.stream_view(names.results_stream, names.results_subject(job.job_id))
    items = [decode(data, RESULT) for _, _, data in viewed]
    assert [i.text.strip() for i in items if isinstance(i, ResultChunk)] == ["one", "two"]
    assert isinstance(items[-1], ResultFinal) and items[-1].status == "completed"
    assert not [c for c in await cli.consumer_ls(names.results_stream) if c["name"].startswith("stream_pager_")]

    async with cli.sub(names.results_subject(job.job_id), all=True) as stored:
        replayed = [decode((await next_json(stored))[1], RESULT) for _ in items]
    assert replayed == items


async def test_cancel_goes_through_the_api_not_the_cancel_subject(
    control_plane: Any, start_worker: Any, demo_fn: Any, client: Any, cli: NatsCli, names: Names
) -> None:
    worker = await start_worker(runtimes=["python"])
    await control(cli, names, worker.worker_id, "pause")
    job = await client.submit(job_spec("demo-fn:v1", args=["x"]))

    await cli.nc.publish(names.cancel_subject(job.job_id), encode(CancelJob(job_id=job.job_id)))
    await control(cli, names, worker.worker_id, "status")  # a round trip through the worker
    assert decode(await cli.kv_get(names.jobs_bucket, job.job_id), JobRecord).status == "queued"
    assert (await cli.stream_info(names.dispatch_stream))["state"]["messages"] == 1

    reply = await cli.req(names.api_subject("jobs.cancel"), json.dumps({"job_id": job.job_id, "reason": "stuck"}))
    assert decode(reply.data, JobRecord).status == "cancelled"
    record = decode(await cli.kv_get(names.jobs_bucket, job.job_id), JobRecord)
    assert (record.status, record.error.code, record.error.message) == ("cancelled", "cancelled", "stuck")
    assert (await cli.stream_info(names.dispatch_stream))["state"]["messages"] == 0
    final = decode(
        (await cli.stream_view(names.results_stream, names.results_subject(job.job_id)))[-1][2], RESULT)
    assert isinstance(final, ResultFinal) and final.status == "cancelled"


# ----------------------------------------------------------------------------- every command


class DocRun:
    """Runs the doc's commands in one namespace against a live platform."""

    def __init__(self, cli: NatsCli, names: Names, client: Any, control_plane: Any, worker: Any,
                 jobs: dict[str, str]) -> None:
        self.cli, self.names, self.client, self.cp, self.worker = cli, names, client, control_plane, worker
        self.jobs = jobs
        self.default = {v: k for k, v in name_catalog(Names()).items() if k != "api queue group"}
        self.here = name_catalog(names)

    def translate(self, argv: list[str]) -> list[str]:
        """The default names as this namespace's, the placeholders as real ids."""
        endpoint = next((k.removeprefix("api ") for k, v in name_catalog(Names()).items()
                         if k.startswith("api ") and v in argv), "")
        job_id = self.jobs.get(endpoint, self.jobs["done"])
        out = []
        for arg in argv:
            arg = self.here[self.default[arg]] if arg in self.default else arg
            out.append(arg.replace(JOB, job_id).replace(WORKER, self.worker.worker_id))
        return out

    async def run(self, argv: list[str]) -> None:
        cli, n = self.cli, self.names
        pos, flags = split_argv(self.translate(argv))
        bucket_types: dict[str, Any] = {n.jobs_bucket: JobRecord, n.workers_bucket: WorkerRecord,
                                        n.models_bucket: ModelRecord, n.pools_bucket: PoolSpec}
        match pos:
            case ["micro", "ls"]:
                assert self.cp.service.id in {i["id"] for i in await cli.micro_ls()}
            case ["micro", "info", service]:
                info, stats = await cli.micro_info(service)
                assert info["metadata"]["namespace"] == n.prefix and len(stats["endpoints"]) == len(ENDPOINTS)
            case ["micro", "stats", service]:
                assert self.cp.service.id in {s["id"] for s in await cli.micro_stats(service)}
            case ["kv", "ls"]:
                assert set(bucket_types) <= set(await cli.kv_ls())
            case ["kv", "ls", bucket]:
                keys = await cli.kv_keys(bucket)
                assert keys, f"{bucket} lists no keys"
                if bucket == n.idempotency_bucket:
                    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
            case ["kv", "get", bucket, key] if bucket == n.autoscaler_bucket:
                decode(await cli.kv_get(bucket, key), LeaseRecord if key == Names.AUTOSCALER_LEASE_KEY else PoolStatus)
            case ["kv", "get", bucket, key]:
                decode(await cli.kv_get(bucket, key), bucket_types[bucket])
            case ["kv", "watch", bucket, *key]:
                async with cli.kv_watch(bucket, *key) as watch:
                    decode((await next_json(watch))[1], bucket_types[bucket])
            case ["object", "ls", bucket]:
                assert await cli.object_ls(bucket)
            case ["object", "info", bucket, name]:
                info = await cli.object_info(bucket, name)
                assert info["name"] == name and info["size"] > 0 and info["digest"].startswith("SHA-256=")
            case ["stream", "ls"]:
                assert {n.dispatch_stream, n.results_stream} <= set(await cli.stream_ls())
            case ["stream", "info", stream]:
                assert (await cli.stream_info(stream))["config"]["name"] == stream
            case ["stream", "subjects", stream]:
                await cli.stream_subjects(stream)
            case ["stream", "view", stream]:
                for _, _, data in await cli.stream_view(stream, str(flags.get("--subject", ">"))):
                    decode(data, Dispatch if stream == n.dispatch_stream else RESULT)
            case ["consumer", "ls", stream]:
                assert n.dispatch_consumer("python", 5, model_token("demo-fn", "v1")) in {
                    c["name"] for c in await cli.consumer_ls(stream)}
            case ["consumer", "info", stream, consumer]:
                _, runtime, priority, model = self.default_label(argv, "consumer ").split()
                info = await cli.consumer_info(stream, consumer)
                assert info["config"]["filter_subject"] == n.dispatch_filter(runtime, int(priority), model)
            case ["sub", subject]:
                async with cli.sub(subject, all=bool(flags.get("--all"))) as sub:
                    if subject == n.results_all:
                        await self.client.submit(job_spec("demo-fn:v1", args=["poke"]))
                    _, data = await next_json(sub)
                    decode(data, WorkerRecord if subject == n.heartbeat_all else RESULT)
            case ["req", subject, body]:
                reply = await cli.req(subject, body)
                if subject == n.worker_control_subject(self.worker.worker_id):
                    decode(reply.data, WorkerRecord)
                else:
                    assert not (reply.headers or {}).get(HDR_SERVICE_ERROR), reply.data
                    decode(reply.data, REPLY_TYPES[self.default_label(argv, "api ").removeprefix("api ")])
            case _:
                pytest.fail(f"no runner for `nats {shlex.join(argv)}`")

    def default_label(self, argv: list[str], prefix: str) -> str:
        """What the first default name in ``argv`` starting with ``prefix`` is (``api jobs.get``)."""
        return next(self.default[a] for a in argv if self.default.get(a, "").startswith(prefix))


async def test_every_documented_command_answers(
    control_plane: Any, start_worker: Any, demo_fn: Any, demo_model: Any, client: Any, cli: NatsCli, names: Names,
    nats_settings: Any, tmp_path: Path,
) -> None:
    worker = await start_worker(runtimes=["python"])
    # The pool the doc reads, and an autoscaler acting on it (max 0: it starts nothing).
    await client.set_pool(PoolSpec(name=POOL, runtimes=["python"], min_workers=0, max_workers=0))
    scaler = Autoscaler(cli.nc, nats_settings, AutoscalerSettings(instance_id="ops", metrics_port=-1,
                                                                  state_dir=tmp_path / "autoscaler"))
    await scaler.start()
    await assert_eventually(lambda: scaler.ticks > 0, message="the autoscaler acting")
    done = await client.run(job_spec("demo-fn:v1", function="stream_words", args=["a b"]), timeout=30)
    failed = await client.run(failing_spec(), timeout=30)
    running = await client.submit(job_spec("demo-fn:v1", function="sleep", args=[60]))
    key = "ops-" + uuid.uuid4().hex
    once = await client.submit(job_spec("demo-fn:v1", args=["once"], idempotency_key=key))
    assert await cli.kv_get(names.idempotency_bucket, hashlib.sha256(key.encode()).hexdigest()) == once.job_id.encode()
    jobs = {"done": done.job_id, "jobs.cancel": running.job_id, "jobs.retry": failed.job_id}
    run = DocRun(cli, names, client, control_plane, worker, jobs)

    commands = sorted(doc_commands(), key=lambda argv: "drain" in "".join(argv))  # drain stops the worker
    try:
        for argv in commands:
            try:
                await run.run(argv)
            except Exception as e:
                raise AssertionError(f"`nats {shlex.join(argv)}` failed: {e!r}") from e
    finally:
        await scaler.stop()
