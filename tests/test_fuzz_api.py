"""Fuzzing the control plane's API: whatever arrives on ``mnemos.api.*``, it answers.

Random bytes, random JSON and JSON shaped like the real request bodies (with random
values in the real fields, so decoding gets past the first check and validation,
catalog lookups, idempotency claims, cancel and retry run) go to every endpoint. Each
request must be answered within the request timeout with either a success body that
decodes as the endpoint's reply type, or the one error envelope carrying a known, stable
code, and never ``internal`` (a 500 is an unhandled bug). Afterwards the same control
plane still runs a job end to end.

Hypothesis and async fixtures do not mix, so hypothesis only *generates* here: a sync
``@given`` function collects the payloads, which are then sent concurrently. The seed is
random per run (``MNEMOS_FUZZ_SEED`` pins it) and printed with any failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, get_args

import nats.errors
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mnemos.client import job_spec
from mnemos.endpoints import ENDPOINTS
from mnemos.errors import ERROR_CLASSES
from mnemos.messages import (
    ErrorReply,
    JobStatus,
    decode,
)
from mnemos.names import HDR_SERVICE_ERROR, HDR_SERVICE_ERROR_CODE, Names
from tests.conftest import assert_eventually

#: Reply type of a successful answer, per endpoint.
SUCCESS_TYPES: dict[str, type[Any]] = {e.name: e.reply for e in ENDPOINTS}
#: Every endpoint, by name (``jobs.submit``), in declared order.
ENDPOINT_NAMES = [e.name for e in ENDPOINTS]

REQUEST_TIMEOUT_S = 5.0
CONCURRENCY = 64
#: Examples drawn per strategy (each generic payload goes to all nine endpoints).
EXAMPLES = int(os.environ.get("MNEMOS_FUZZ_EXAMPLES", "300"))
FUZZ_SEED = int(os.environ.get("MNEMOS_FUZZ_SEED", str(random.randrange(2**32))))

KNOWN_CODES = set(ERROR_CLASSES) - {"internal"}
#: NATS and JetStream are healthy throughout: "cannot serve this right now" (retryable)
#: would tell a client to retry a request that can never succeed.
INFRA_CODES = {"unavailable", "not_connected"}


# ---------------------------------------------------------------------------- strategies

_huge_ints = st.integers(min_value=2**63 - 2, max_value=2**80) | st.integers(min_value=-(2**80), max_value=-(2**63) + 2)
#: Long strings built cheaply (hypothesis' own size budget stays small).
_long_text = st.builds(lambda c, n: c * n, st.characters(), st.integers(min_value=256, max_value=20_000))
_text = st.text(max_size=40) | st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | _long_text

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | _huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)  # json.dumps writes NaN / Infinity: invalid JSON
    | _text
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=12), kids, max_size=6),
    max_leaves=25,
)
#: Cheaper values for the fields of request-shaped bodies.
small_scalars = st.none() | st.booleans() | st.integers() | _huge_ints | st.floats() | st.text(max_size=20) | _long_text
small_json = st.recursive(
    small_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=8,
)


def _dumps(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False + surrogatepass turns lone surrogates into invalid UTF-8: also fuzz.
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def as_json(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(_dumps, values, st.booleans())


#: Where a JobSpec holds arbitrary JSON (its typed fields reject nesting early). The model
#: is not registered: a jobs.run that passed would wait for a worker that is not there.
_DEEP_SPOTS = {
    "metadata": b'{"model": {"family": "ghost", "version": "v1"}, "metadata": {"deep": %s}}',
    "args": b'{"model": {"family": "ghost", "version": "v1"}, "input": {"args": %s}}',
    "kwargs": b'{"model": {"family": "ghost", "version": "v1"}, "input": {"kwargs": {"deep": %s}}}',
    "context": b'{"model": {"family": "ghost", "version": "v1"}, "input": {"context": {"deep": %s}}}',
    "runtime_config": b'{"model": {"family": "ghost", "version": "v1", "runtime_config": {"deep": %s}}}',
}


def _nested(depth: int, kind: str) -> bytes:
    lists = b"[" * depth + b"]" * depth
    if kind == "list":
        return lists
    if kind == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return _DEEP_SPOTS[kind] % lists


#: Deeply nested JSON (decoders recurse).
nested_json = st.builds(
    _nested, st.integers(min_value=1, max_value=5_000), st.sampled_from(["list", "dict", *_DEEP_SPOTS])
)

statuses = list(get_args(JobStatus))
runtimes = st.sampled_from([None, "python", "transformers", "vllm", "pytorch", "tensorflow", "", "x" * 40]) | small_json


def model_refs(registered: bool) -> st.SearchStrategy[Any]:
    """``model`` of a JobSpec; ``registered`` lets it name the registered ``demo-fn:v1``."""
    families = ["ghost", "a", "-bad", "x" * 70, "", "demo.fn", "demo:fn", "demo fn", "*", ">"]
    if registered:
        families += ["demo-fn"] * 6
    versions = ["v1", "v1", "1.", "1..2", ".1", "v1.0", "v_1", "", "a" * 65, "v1.*", "v1.>"]
    config_values = st.sampled_from(
        ["functions.py:echo", "functions.py:add", "functions.py:nope", "nofile.py:f", "bad", "echo", "add",
         "fail", "noop", "nope", "1bad", "", True, False, 0, 1, 8, "cpu", "cuda", "auto", "float16", None]
    ) | small_json
    config_keys = st.sampled_from(["entrypoint", "function", "threaded", "device", "dtype", "torch_dtype",
                                   "load_in_8bit", "load_in_4bit", "tensor_parallel_size", "batch_size", "bogus"])
    return st.fixed_dictionaries(
        {"family": st.sampled_from(families) | _text, "version": st.sampled_from(versions) | _text},
        optional={
            "runtime": runtimes,
            "runtime_config": st.dictionaries(config_keys, config_values, max_size=4) | small_json,
            "bogus": small_json,
        },
    ) | small_json


inputs = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.none() | _text | small_json,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "max_tokens": st.sampled_from([0, 1, 32768, 32769, -1, None]) | small_scalars,
                "temperature": st.sampled_from([0.0, 2.0, 2.1, -0.1, None]) | small_scalars,
                "top_p": st.sampled_from([0.0, 1.0, 1.1]) | small_scalars,
                "top_k": json_scalars,
                "stop": st.lists(st.text(max_size=5), max_size=3) | small_json,
                "seed": json_scalars,
                "bogus": json_scalars,
            },
        ) | small_json,
        "context": st.none() | st.dictionaries(st.text(max_size=8), small_json, max_size=4) | small_json,
        "args": st.lists(small_json, max_size=4) | small_json,
        "kwargs": st.dictionaries(st.text(max_size=8), small_json, max_size=4) | small_json,
    },
) | small_json

retry_configs = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["io.mnemos.v1.retry_policy", "bogus"]),
        "strategy": st.sampled_from(["exponential", "linear", "fixed", "random"]) | small_scalars,
        "max_retries": st.integers(min_value=-2, max_value=12) | small_scalars,
        "initial_delay_seconds": st.floats(min_value=-1, max_value=4000) | small_scalars,
        "max_delay_seconds": json_scalars,
        "backoff_multiplier": st.floats(min_value=0, max_value=11) | small_scalars,
        "jitter": json_scalars,
        "retry_on_errors": st.lists(st.sampled_from(sorted(ERROR_CLASSES)), max_size=3) | small_json,
    },
) | small_json

_spec_fields = {
    "input": inputs,
    "job_type": st.sampled_from(["inference", "batch_inference", "training", "fine_tuning", "evaluation", "x"])
    | small_scalars,
    "priority": st.sampled_from([1, 5, 10, 0, 11, -1, 2**64, 1.5, "5", None, True]) | small_scalars,
    "timeout_seconds": st.sampled_from([0, -1, 1e-9, 0.5, 86400, 86401, 1e400, "10", None]) | small_scalars,
    "retry_config": retry_configs,
    "metadata": st.dictionaries(st.text(max_size=12), small_json, max_size=5) | small_json,
    "idempotency_key": st.sampled_from(["k1", "k2", "k3", "", "x" * 256, "x" * 257, None]) | _text | small_scalars,
    "type": st.sampled_from(["io.mnemos.v1.job_spec", "io.mnemos.v1.job", "bogus"]) | small_scalars,
    "bogus": small_json,
}


def job_specs(registered: bool) -> st.SearchStrategy[Any]:
    """Dicts with JobSpec's real field names and random (often almost valid) values."""
    return st.fixed_dictionaries({"model": model_refs(registered)}, optional=_spec_fields) | st.fixed_dictionaries(
        {}, optional={"model": model_refs(registered), **_spec_fields}
    )


#: Job ids that cannot be KV keys (or subject tokens), and two that could but name no job.
BAD_JOB_IDS = [".", "*", ">", "a.b", "a b", " ", "", "a*", "a>", "$KV", "../x", "a\nb", "a\x00b", "\t", "é",
               "a.", ".a", "a..b", "x" * 64, "x" * 65, "y" * 200, "01J0000000000000000000000.", "NOPE"]


def job_ids(known: list[str]) -> st.SearchStrategy[Any]:
    # A lone surrogate: \ud800 escaped, or (unescaped) bytes that are not UTF-8.
    return st.sampled_from([*known, *BAD_JOB_IDS, "\ud800"]) | _text | small_scalars


model_names = st.sampled_from(
    ["demo-fn:v1", "demo-fn.v1", "demo-fn", "demo-fn:", "a:", ":", ":v1", "a b:v1", "a*:v1", "a>:v1",
     "a:b.c", "a:.", "a:..", "a:b c", "ghost:v9", "x" * 160, "x" * 161, ""]
) | _text | small_scalars


def bodies(known_ids: list[str]) -> dict[str, st.SearchStrategy[Any]]:
    """Per endpoint: dicts with the endpoint's real field names and random values."""
    ids = job_ids(known_ids)
    runtime_body = st.fixed_dictionaries({}, optional={"runtime": runtimes, "bogus": small_json})
    return {
        "jobs.get": st.fixed_dictionaries({"job_id": ids}, optional={"bogus": small_json}),
        "jobs.cancel": st.fixed_dictionaries({"job_id": ids}, optional={"reason": _text | small_scalars}),
        "jobs.retry": st.fixed_dictionaries({"job_id": ids}, optional={"bogus": small_json}),
        "jobs.list": st.fixed_dictionaries(
            {},
            optional={
                "status": st.lists(st.sampled_from([*statuses, "bogus"]), max_size=4) | small_json,
                "model": model_names,
                "limit": st.sampled_from([0, 1, 2, 1000, 1001, -1]) | small_scalars,
                "cursor": ids,
            },
        ),
        "workers.list": runtime_body,
        "models.list": runtime_body,
        "models.get": st.fixed_dictionaries({"name": model_names}, optional={"bogus": small_json}),
        "jobs.submit": job_specs(registered=True),
        # jobs.run answers an accepted job only when a worker finishes it; none runs yet.
        "jobs.run": job_specs(registered=False),
    }


def draw(strategy: st.SearchStrategy[Any], n: int, salt: int = 0, batch: int = 5) -> list[Any]:
    """``n`` examples of ``strategy``, drawn by hypothesis (generation only, no shrinking),
    ``batch`` per hypothesis example (its per-example overhead dominates otherwise)."""
    out: list[Any] = []

    @settings(
        max_examples=max(1, n // batch),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(FUZZ_SEED + salt)
    @given(st.lists(strategy, min_size=batch, max_size=batch))
    def collect(examples: list[Any]) -> None:
        out.extend(examples)

    collect()
    return out


# ---------------------------------------------------------------------------- sending and checking


@dataclass
class Problem:
    endpoint: str
    payload: bytes
    what: str

    def __str__(self) -> str:
        shown = self.payload if len(self.payload) <= 300 else self.payload[:300] + b"...(%d bytes)" % len(self.payload)
        return f"{self.endpoint}: {self.what}\n    payload: {shown!r}"


def check_reply(endpoint: str, msg: Msg) -> str | None:
    """What is wrong with ``msg`` as an answer from ``endpoint``; None if nothing."""
    headers = msg.headers or {}
    if HDR_SERVICE_ERROR_CODE in headers or HDR_SERVICE_ERROR in headers:
        try:
            err = decode(msg.data, ErrorReply).error
        except Exception as e:  # noqa: BLE001 - any failure to decode is the finding
            return f"error reply without the envelope ({e}): {msg.data[:200]!r}"
        if err.code not in KNOWN_CODES:
            return f"error code {err.code!r} (message: {err.message[:300]!r})"
        if err.code in INFRA_CODES:
            return f"infrastructure error {err.code!r} for a request (message: {err.message[:300]!r})"
        status = headers.get(HDR_SERVICE_ERROR_CODE)
        if status != str(ERROR_CLASSES[err.code].status):
            return f"header {HDR_SERVICE_ERROR_CODE}={status!r} for code {err.code!r}"
        if not headers.get(HDR_SERVICE_ERROR) or not err.message:
            return f"error {err.code!r} without a message"
        return None
    try:
        json.loads(msg.data)
    except ValueError:
        return f"success reply is not JSON: {msg.data[:200]!r}"
    try:
        decode(msg.data, SUCCESS_TYPES[endpoint])
    except Exception as e:  # noqa: BLE001
        return f"success reply is not a {SUCCESS_TYPES[endpoint].__name__}: {e}"
    return None


async def fire(nc: NATS, names: Names, requests: Iterable[tuple[str, bytes]]) -> tuple[list[Problem], dict[str, int]]:
    """Send every ``(endpoint, payload)`` concurrently; the problems and a count of outcomes."""
    gate = asyncio.Semaphore(CONCURRENCY)
    problems: list[Problem] = []
    outcomes: dict[str, int] = {}

    async def one(endpoint: str, payload: bytes) -> None:
        async with gate:
            try:
                msg = await nc.request(names.api_subject(endpoint), payload, timeout=REQUEST_TIMEOUT_S)
            except nats.errors.TimeoutError:
                problems.append(Problem(endpoint, payload, f"no answer within {REQUEST_TIMEOUT_S}s"))
                return
            except nats.errors.NoRespondersError:
                problems.append(Problem(endpoint, payload, "no responders (control plane gone?)"))
                return
        what = check_reply(endpoint, msg)
        if what is not None:
            problems.append(Problem(endpoint, payload, what))
            return
        headers = msg.headers or {}
        key = "ok" if HDR_SERVICE_ERROR_CODE not in headers else decode(msg.data, ErrorReply).error.code
        outcomes[key] = outcomes.get(key, 0) + 1

    await asyncio.gather(*(one(e, p) for e, p in requests))
    return problems, outcomes


def report(problems: list[Problem], limit: int = 12) -> str:
    """The smallest offending payloads first, one per distinct finding."""
    seen: dict[tuple[str, str], Problem] = {}
    for p in sorted(problems, key=lambda p: len(p.payload)):
        seen.setdefault((p.endpoint, p.what[:60]), p)
    shown = "\n".join(str(p) for p in list(seen.values())[:limit])
    return f"{len(problems)} bad answers (seed {FUZZ_SEED}; MNEMOS_FUZZ_SEED={FUZZ_SEED} replays):\n{shown}"


async def serves_a_job(start_worker: Callable[..., Any], client: Any) -> None:
    await start_worker()
    record = await client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]), timeout=30)
    assert record.status == "completed", record
    assert record.output.result == 5


# ---------------------------------------------------------------------------- tests


async def test_fuzzed_requests_get_an_answer_and_the_control_plane_keeps_serving(
    control_plane, demo_fn, nc: NATS, names: Names, client, start_worker
) -> None:
    t0 = time.monotonic()
    # A few real jobs, so cancel / retry / get / list also take their success paths.
    known = [(await client.submit(job_spec("demo-fn:v1", function="add", args=[1, i]))).job_id for i in range(3)]

    generic = {
        "random bytes": draw(st.binary(max_size=2048), EXAMPLES, 1),
        "random JSON": draw(as_json(json_values), EXAMPLES, 2),
        "deep JSON": draw(nested_json, max(EXAMPLES // 10, 10), 3),
    }
    shaped = {e: draw(as_json(s), EXAMPLES, 10 + i) for i, (e, s) in enumerate(bodies(known).items())}
    requests = [(e, p) for payloads in generic.values() for p in payloads for e in ENDPOINT_NAMES]
    requests += [(e, p) for e, payloads in shaped.items() for p in payloads]
    random.Random(FUZZ_SEED).shuffle(requests)  # interleave endpoints and kinds
    t_drawn = time.monotonic()

    problems, outcomes = await fire(nc, names, requests)
    t_sent = time.monotonic()
    print(f"fuzz seed {FUZZ_SEED}: {len(requests)} requests; drawn in {t_drawn - t0:.1f}s, "
          f"answered in {t_sent - t_drawn:.1f}s; outcomes {dict(sorted(outcomes.items()))}")
    if problems:
        print(report(problems))

    # Nothing left hanging, and the same control plane still runs a job end to end.
    await assert_eventually(lambda: not control_plane._tasks, message="no request left in flight")
    await serves_a_job(start_worker, client)
    assert not problems, report(problems)
    assert outcomes.get("ok", 0) > 0 and outcomes.get("validation_error", 0) > 0, outcomes


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_NAMES))
async def test_oversized_payload_is_payload_too_large(endpoint: str, control_plane, nc: NATS, names: Names) -> None:
    limit = control_plane.settings.max_request_bytes
    spec = b'{"model": {"family": "demo-fn", "version": "v1"}, "metadata": {"pad": "'
    for payload in (b"\xff" * 600_000, spec + b"x" * 600_000 + b'"}}', b" " * (limit + 1)):
        reply = await nc.request(names.api_subject(endpoint), payload, timeout=REQUEST_TIMEOUT_S)
        assert check_reply(endpoint, reply) is None
        assert reply.headers[HDR_SERVICE_ERROR_CODE] == "413"
        assert decode(reply.data, ErrorReply).error.code == "payload_too_large"


async def test_requests_without_reply_subject_crash_nothing(
    control_plane, demo_fn, nc: NATS, names: Names, client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mnemos.control_plane")
    valid = json.dumps({"model": {"family": "demo-fn", "version": "v1", "runtime_config": {"function": "noop"}}})
    payloads = [b"", b"\x00\xff", b"{not json", b"[]", b"{}", b"null", valid.encode(), b'{"job_id": "NOPE"}',
                b'{"job_id": "a.b"}', b'{"name": "ghost:v9"}', b"x" * 600_000]
    for endpoint in ENDPOINT_NAMES:
        for payload in payloads:
            await nc.publish(names.api_subject(endpoint), payload)
    await nc.flush()

    # Still answering, and the fire-and-forget submit above was stored like any other job.
    async def submitted_without_reply() -> bool:
        listed = await client.list()
        return len(listed.jobs) == 1

    await assert_eventually(submitted_without_reply, timeout=10, message="no-reply jobs.submit stored")
    job = await client.submit(job_spec("demo-fn:v1", function="add", args=[1, 2]))
    assert (await client.get(job.job_id)).status == "queued"
    await assert_eventually(lambda: not control_plane._tasks, message="no request left hanging")
    crashes = [r.getMessage() for r in caplog.records
               if "unexpected error" in r.getMessage() or "code='internal'" in r.getMessage()]
    assert not crashes, crashes


@pytest.mark.parametrize("endpoint", ["jobs.get", "jobs.cancel", "jobs.retry"])
async def test_job_ids_that_cannot_be_kv_keys(endpoint: str, control_plane, nc: NATS, names: Names) -> None:
    for job_id in BAD_JOB_IDS:
        payload = json.dumps({"job_id": job_id}).encode()
        reply = await nc.request(names.api_subject(endpoint), payload, timeout=REQUEST_TIMEOUT_S)
        assert check_reply(endpoint, reply) is None, (job_id, reply.data)
        code = decode(reply.data, ErrorReply).error.code
        assert code in ("validation_error", "job_not_found"), (job_id, code)


_DEEP = b"[" * 3_000 + b"]" * 3_000
_MALFORMED = ("invalid_json", "validation_error")


@pytest.mark.parametrize(
    "endpoint,payload,codes",
    [
        # Found by the fuzzing above; each must be a client error, never internal/unavailable.
        pytest.param("jobs.run", _DEEP_SPOTS["args"] % _DEEP, _MALFORMED, id="deep-input.args"),
        pytest.param("jobs.submit", _DEEP_SPOTS["runtime_config"] % _DEEP, _MALFORMED, id="deep-runtime_config"),
        pytest.param("jobs.submit", _DEEP_SPOTS["metadata"] % _DEEP, _MALFORMED, id="deep-metadata"),
        pytest.param("jobs.get", b'{"job_id": "\xed\xa0\x80"}', _MALFORMED, id="surrogate-not-utf8"),
        pytest.param("jobs.cancel", b'{"job_id": "A", "reason": "\xff"}', _MALFORMED, id="not-utf8"),
        pytest.param("jobs.submit", b'{"model": {"family": "ghost", "version": "1."}}',
                     ("unknown_model", "validation_error"), id="version-trailing-dot"),
        pytest.param("jobs.run", b'{"model": {"family": "ghost", "version": "1..2"}}',
                     ("unknown_model", "validation_error"), id="version-double-dot"),
        pytest.param("models.get", b'{"name": "a:"}', ("model_not_found", "validation_error"), id="name-empty-version"),
        pytest.param("models.get", b'{"name": "a b:v1"}', ("model_not_found", "validation_error"), id="name-space"),
        pytest.param("models.get", b'{"name": "a*:v1"}', ("model_not_found", "validation_error"), id="name-wildcard"),
        pytest.param("models.get", b'{"name": "ghost:1..2"}', ("model_not_found", "validation_error"),
                     id="name-double-dot"),
    ],
)
async def test_payloads_that_crashed_the_control_plane(
    endpoint: str, payload: bytes, codes: tuple[str, ...], control_plane, nc: NATS, names: Names
) -> None:
    reply = await nc.request(names.api_subject(endpoint), payload, timeout=REQUEST_TIMEOUT_S)
    assert check_reply(endpoint, reply) is None, reply.data
    assert decode(reply.data, ErrorReply).error.code in codes, reply.data


async def test_tenant_subjects_that_name_no_tenant_or_endpoint(control_plane, nc: NATS, names: Names) -> None:
    """On ``<ns>.tenant.<tenant>.api.<endpoint>`` the subject picks the tenant and the
    endpoint: a token that is no tenant name is ``validation_error``, no endpoint
    ``invalid_request``; a well-formed one is served for that tenant."""
    prefix = names.tenant_api_all("x").removesuffix(".x.api.>")
    cases = {
        f"{prefix}.é$.api.jobs.list": "validation_error",
        f"{prefix}.-a.api.jobs.list": "validation_error",
        f"{prefix}.{'t' * 65}.api.jobs.list": "validation_error",
        names.tenant_api_all("acme", "jobs.nothing"): "invalid_request",
        names.tenant_api_all("acme", "nope.list"): "invalid_request",
    }
    for subject, expected in cases.items():
        reply = await nc.request(subject, b"{}", timeout=REQUEST_TIMEOUT_S)
        assert (reply.headers or {}).get(HDR_SERVICE_ERROR_CODE), (subject, reply.data)
        assert decode(reply.data, ErrorReply).error.code == expected, (subject, reply.data)
    listed = await nc.request(names.tenant_api_subject("acme", "jobs.list"), b"{}", timeout=REQUEST_TIMEOUT_S)
    assert check_reply("jobs.list", listed) is None, listed.data
