"""OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions``.

A request becomes one MNEMOS job on the named model (``family:version`` or an alias):
``jobs.run`` when not streaming, ``jobs.submit`` plus the job's result stream when
``stream`` is true (``data:`` chunks, then ``data: [DONE]``). Chat messages are rendered by
the worker with the model's own chat template. Unset ``temperature`` means 1.0, as in
OpenAI's API. Bodies are read strictly: ``"stream": "yes"`` is not a boolean, an unknown
field is an error, and parameters MNEMOS cannot honour (``n`` > 1, penalties, logprobs,
tools, ``response_format``...) are refused with 422 rather than silently ignored; only
OpenAI's bookkeeping fields (``user``, ``metadata``, ``store``...) are accepted and
ignored. A client that disconnects from a stream cancels its job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from control_plane.gateway.deps import GatewayState, gateway_state, tenant_client
from control_plane.gateway.http import ERROR_RESPONSES, MsgspecResponse, require_json, to_builtins
from mnemos.client import Client
from mnemos.names import TEXT_RUNTIMES
from mnemos.errors import ValidationFailed, WorkerLost, from_info
from mnemos.messages import (
    MAX_STOP_CHARS,
    TERMINAL_STATUSES,
    JobOutput,
    JobRecord,
    JobSpec,
    ResultChunk,
    ResultFinal,
    decode,
    encode,
)

__all__ = ["router", "CompletionRequest", "ChatCompletionRequest"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["openai"], dependencies=[Depends(require_json)])

_MAX_SEED = 2**63 - 1


#: Strict JSON types (no "yes" for a boolean, no "1" for a number) and no unknown fields.
_STRICT = ConfigDict(strict=True, extra="forbid")

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    # Fields that would change the result and that MNEMOS cannot honour are checked in
    # _supported(); OpenAI's bookkeeping fields (user, metadata, store...) are accepted and
    # ignored; anything else is an unknown field (422).
    model_config = _STRICT

    model: str = Field(min_length=1, max_length=160, description="`family:version` or an alias")
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2, description="Unset: 1.0")
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: StopString | list[StopString] | None = Field(default=None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    n: int | None = Field(default=None, ge=1, description="Only 1")
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="Accepted and ignored")
    store: bool | None = Field(default=None, description="Accepted and ignored")
    service_tier: str | None = Field(default=None, max_length=32, description="Accepted and ignored")
    prompt_cache_key: str | None = Field(default=None, max_length=256, description="Accepted and ignored")
    safety_identifier: str | None = Field(default=None, max_length=256, description="Accepted and ignored")
    presence_penalty: float | None = Field(default=None, description="Only 0")
    frequency_penalty: float | None = Field(default=None, description="Only 0")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported")
    logprobs: Any = Field(default=None, description="Not supported")

    @model_validator(mode="after")
    def _supported(self) -> "_Sampling":
        unsupported = []
        if self.n not in (None, 1):
            unsupported.append("n > 1")
        if self.presence_penalty or self.frequency_penalty:
            unsupported.append("presence_penalty/frequency_penalty")
        if self.logit_bias:
            unsupported.append("logit_bias")
        if self.logprobs not in (None, False, 0):
            unsupported.append("logprobs")
        unsupported.extend(self._unsupported_extra())
        if unsupported:
            raise ValueError(f"not supported by MNEMOS: {', '.join(unsupported)}")
        return self

    def _unsupported_extra(self) -> list[str]:
        return []

    def _stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop) or None

    def parameters(self, max_tokens: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": 1.0 if self.temperature is None else self.temperature}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if (stops := self._stops()) is not None:
            params["stop"] = stops
        if self.seed is not None:
            params["seed"] = self.seed
        return params


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1, max_length=1)] = Field(description="One prompt (a list of exactly one is accepted too)")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"model": "demo-gpt2:v1", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    ]})

    def _unsupported_extra(self) -> list[str]:
        bad = []
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of not in (None, 1):
            bad.append("best_of > 1")
        return bad

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """A chat turn. ``content`` is text (or text parts); ``null`` content belongs to tool
    calls, which MNEMOS does not support, so it is refused."""

    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=128, description="Accepted and ignored")
    tool_call_id: str | None = Field(default=None, max_length=128, description="Accepted and ignored")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    tools: list[Any] | None = Field(default=None, description="Not supported")
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted and ignored (no tools)")

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"model": "demo-gpt2:v1", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16},
    ]})

    def _unsupported_extra(self) -> list[str]:
        return ["tools"] if self.tools else []


# ----------------------------------------------------------------------------- routes


@router.post("/completions", summary="Text completion (OpenAI-compatible)",
             responses={200: {"description": "A `text_completion`, or with `stream` an event stream of them",
                              "content": {"application/json": {}, "text/event-stream": {}}}})
async def completions(
    body: CompletionRequest,
    client: Client = Depends(tenant_client),
    state: GatewayState = Depends(gateway_state),
) -> Response:
    job_input = {"prompt": body.prompt_text(), "parameters": body.parameters(body.max_tokens or 16)}
    return await _complete(client, state, body, job_input, "text_completion")


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)",
             responses={200: {"description": "A `chat.completion`, or with `stream` an event stream of "
                                             "`chat.completion.chunk`",
                              "content": {"application/json": {}, "text/event-stream": {}}}})
async def chat_completions(
    body: ChatCompletionRequest,
    client: Client = Depends(tenant_client),
    state: GatewayState = Depends(gateway_state),
) -> Response:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    job_input = {"messages": messages, "parameters": body.parameters(body.max_completion_tokens or body.max_tokens)}
    return await _complete(client, state, body, job_input, "chat.completion")


async def _complete(client: Client, state: GatewayState, body: _Sampling, job_input: dict[str, Any],
                    kind: str) -> Response:
    model = await client.model(body.model)
    if model.runtime not in TEXT_RUNTIMES:
        raise ValidationFailed(f"model {model.name} runs on {model.runtime!r}; completions need a text model "
                               f"({', '.join(TEXT_RUNTIMES)})")
    spec: JobSpec = decode(encode({
        "model": {"family": model.family, "version": model.version},
        "input": job_input,
        "timeout_seconds": state.settings.openai_job_timeout_s,
        "metadata": {"api": f"openai.{kind}", **({"user": body.user} if body.user else {})},
    }), JobSpec)
    if body.stream:
        record = await client.submit(spec)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _Stream(client, state, record, kind, body.model, include_usage)
        return StreamingResponse(stream.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    record = await client.run(spec, timeout=state.settings.openai_job_timeout_s + 30.0)
    output = _completed_output(record)
    meta = output.metadata
    usage = _usage(meta)
    _count_tokens(state, usage)
    text = output.result if isinstance(output.result, str) else str(output.result)
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(meta), "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return MsgspecResponse({
        "id": _response_id(kind, record.job_id), "object": kind, "created": int(record.created_at.timestamp()),
        "model": body.model, "choices": [choice], "usage": usage, "system_fingerprint": None,
    })


def _completed_output(record: JobRecord) -> JobOutput:
    if record.status != "completed" or record.output is None:
        if record.error is not None:
            raise from_info(record.error)
        raise WorkerLost(f"job {record.job_id} ended {record.status} without a result")
    return record.output


def _response_id(kind: str, job_id: str) -> str:
    return f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{job_id}"


def _usage(meta: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(meta.get("prompt_tokens", 0)), int(meta.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(meta: dict[str, Any]) -> str:
    return "length" if meta.get("finish_reason") == "length" else "stop"


def _count_tokens(state: GatewayState, usage: dict[str, int]) -> None:
    state.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
    state.metrics.tokens.labels("completion").inc(usage["completion_tokens"])


class _Stream:
    """One streamed completion: the job's result stream as OpenAI chunks."""

    def __init__(self, client: Client, state: GatewayState, record: JobRecord, kind: str, model: str,
                 include_usage: bool) -> None:
        self.client, self.state, self.job_id = client, state, record.job_id
        self.chat = kind == "chat.completion"
        self.id = _response_id(kind, record.job_id)
        self.created = int(record.created_at.timestamp())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, text: str | None, finish: str | None = None, *, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return self._data({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                           "choices": [choice]})

    def _usage_chunk(self, usage: dict[str, int]) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._data({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                           "choices": [], "usage": usage})

    @staticmethod
    def _data(payload: Any) -> bytes:
        return b"data: " + encode(payload) + b"\n\n"

    async def events(self) -> AsyncIterator[bytes]:
        gauge = self.state.metrics.streams.labels("openai")
        gauge.inc()
        ended = False
        try:
            if self.chat:
                yield self._chunk("", role=True)
            text_attempt: int | None = None
            async for item in self.client.stream(self.job_id):
                if isinstance(item, ResultChunk):
                    if text_attempt is not None and item.attempt != text_attempt:
                        # The job is being retried after it streamed text: that text cannot be
                        # taken back, so this completion fails (retry the request).
                        err = WorkerLost("the job was retried after streaming part of its output; retry the request")
                        yield self._data({"error": to_builtins(err.info())})
                        await self.client.cancel(self.job_id, "the streaming client gave up on a retried job")
                        ended = True
                        break
                    text_attempt = item.attempt
                    if item.text:
                        yield self._chunk(item.text)
                elif isinstance(item, ResultFinal) and item.status in TERMINAL_STATUSES:
                    ended = True
                    if item.status == "completed" and item.output is not None:
                        meta = item.output.metadata
                        yield self._chunk(None if self.chat else "", _finish_reason(meta))
                        usage = _usage(meta)
                        _count_tokens(self.state, usage)
                        if self.include_usage:
                            yield self._usage_chunk(usage)
                    else:
                        info = item.error or WorkerLost(f"job ended {item.status}").info()
                        yield self._data({"error": to_builtins(info)})
                    break
            yield b"data: [DONE]\n\n"
        finally:
            gauge.dec()
            if not ended:  # the client went away (or the stream broke): stop the job
                self.state.background(f"cancel-{self.job_id}",
                                      self.client.cancel(self.job_id, "the streaming client disconnected"))
