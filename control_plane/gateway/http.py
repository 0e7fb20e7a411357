"""The HTTP side of the one error envelope, and msgspec messages as HTTP bodies.

Every error answer is an :class:`~mnemos.messages.ErrorReply` (``{"error": {"code",
"message", "retryable", "details"}}``) with the status of its code from the one table in
:mod:`mnemos.errors`; 429 and 503 carry ``Retry-After``. Wire messages are encoded by
msgspec, and their JSON schemas (also msgspec's) are the OpenAPI components, so the
document describes exactly what is sent.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnemos.errors import Internal, MnemosError, UnsupportedMediaType, ValidationFailed
from mnemos.messages import (
    ErrorInfo,
    ErrorReply,
    JobList,
    JobRecord,
    JobSpec,
    ModelRecord,
    PoolList,
    PoolSpec,
    PoolView,
    ResultChunk,
    ResultFinal,
    ResultStatus,
    WorkerList,
    decode,
    encode,
)

__all__ = [
    "MsgspecResponse",
    "error_response",
    "install_error_handlers",
    "read_body",
    "require_json",
    "schema_ref",
    "json_response_doc",
    "ERROR_RESPONSES",
    "openapi_components",
    "to_builtins",
]

log = logging.getLogger("mnemos.gateway")

#: Messages whose msgspec schemas become OpenAPI components.
_SCHEMA_TYPES: tuple[type[Any], ...] = (
    JobSpec, JobRecord, JobList, WorkerList, ModelRecord, ErrorReply, ResultChunk, ResultFinal, ResultStatus,
    PoolSpec, PoolView, PoolList,
)
_REF = "#/components/schemas/{name}"


def openapi_components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template=_REF)
    return components


def to_builtins(msg: Any) -> Any:
    """A message as plain JSON-able values (to embed in a larger answer)."""
    return msgspec.to_builtins(msg)


def schema_ref(t: type[Any]) -> dict[str, str]:
    return {"$ref": _REF.format(name=t.__name__)}


def json_response_doc(t: type[Any] | dict[str, Any], description: str, example: Any = None) -> dict[str, Any]:
    """An OpenAPI response object for a msgspec type (or a literal schema)."""
    media: dict[str, Any] = {"schema": schema_ref(t) if isinstance(t, type) else t}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


_ERROR_DOC = json_response_doc(ErrorReply, "The error envelope")
#: The error answers every API route may give (documented once).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {**_ERROR_DOC, "description": text}
    for status, text in {
        400: "Malformed JSON (`invalid_json`)",
        401: "Missing or unknown API key (`unauthorized`)",
        403: "A job that tries to choose the code it runs (`override_refused`); a tenant that is not an "
             "operator managing pools (`forbidden`)",
        404: "Not found (`job_not_found`, `model_not_found`, `unknown_model`, `unknown_function`, "
             "`pool_not_found`, `app_not_found`); also another tenant's job",
        409: "Conflict (`conflict`: e.g. a pool that would serve what another pool serves)",
        413: "Request body too large (`payload_too_large`)",
        415: "The body is not sent as `application/json` (`unsupported_media_type`)",
        422: "Validation failed (`validation_error`, `unknown_runtime`)",
        429: "Backpressure (`queue_full`); see `Retry-After`",
        503: "The control plane or NATS is unavailable (`unavailable`); see `Retry-After`",
    }.items()
}


class MsgspecResponse(Response):
    """A JSON response encoded by msgspec (wire messages, as on NATS)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode(content)


def error_response(info: ErrorInfo, status: int, retry_after_s: int | None = None) -> Response:
    """The envelope as an HTTP answer. 429/503 get ``Retry-After``: the error's own
    ``details.retry_after_s`` (the control plane's estimate) or ``retry_after_s``."""
    headers = {}
    hint = (info.details or {}).get("retry_after_s")
    if isinstance(hint, int | float) and hint >= 0:
        retry_after_s = math.ceil(hint)
    if retry_after_s is not None and status in (429, 503):
        headers["Retry-After"] = str(retry_after_s)
    return MsgspecResponse(ErrorReply(error=info), status_code=status, headers=headers)


async def require_json(request: Request) -> None:
    """A route dependency: the body must be declared ``application/json`` (or ``*/*+json``);
    anything else, or no ``Content-Type`` at all, is 415 ``unsupported_media_type``. A
    JSON body is never guessed from a form or plain text. (``async``: FastAPI runs a plain
    ``def`` dependency in its thread pool.)"""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(
            f"send the body as application/json (Content-Type was {media or 'not set'})",
            details={"content_type": media or None},
        )


async def read_body(request: Request, t: type[Any]) -> Any:
    """The request body decoded strictly as the msgspec type ``t`` (400/422 otherwise)."""
    return decode(await request.body(), t)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_mnemos(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, MnemosError)
        return error_response(exc.info(), exc.status, retry_after_s)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        err = ValidationFailed(summary or "invalid request", details={"errors": errors})
        return error_response(err.info(), err.status)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ErrorInfo(code=code, message=str(exc.detail)), exc.status_code)

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error in the gateway", exc_info=exc)
        err = Internal(f"{type(exc).__name__}: {exc}")
        return error_response(err.info(), err.status)

    app.add_exception_handler(MnemosError, on_mnemos)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
