"""Continuous batching: one generation thread per loaded causal LM, shared by its requests.

Requests join and leave the batch between decoding steps, so a request that arrives while
others decode starts at the next step instead of after them. A new request is prefilled
on its own (batch 1: its first token is exactly the unbatched one); its KV cache is then
merged into the running batch. Every row of the batched cache is left-padded to the
longest, an attention mask hides the padding and each row is given its own position ids,
so every row attends to exactly its own tokens at their own positions. Each step decodes
one token for every active sequence in one forward pass, picks each row's token with that
request's own sampling parameters (and its own seeded generator, so a seeded result does
not depend on what else was in the batch), streams it, and retires the rows that ended
(end of text, ``max_tokens``, a stop string, cancellation). Retiring drops the rows from
the cache and trims the padding no remaining row needs. A prefill is not split into
chunks: while a new prompt is read, the others wait for that one forward pass.

Merging rewrites the cache's tensors, so the loop batches only models whose cache is a
list of plain full-attention layers (transformers 5's ``DynamicCache`` of
``DynamicLayer``), checked once at load with a one-token forward pass. Any other cache
(sliding window, linear-attention state, transformers 4's layout) runs one sequence at a
time through the same loop.

A failed forward pass fails the requests that were in it and the loop goes on; an error
in the loop itself fails every request it holds and ends the thread, and the next request
starts a new one. torch is imported when a loop is built, not when this module is imported.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mnemos.errors import ExecutionError, MnemosError, ValidationFailed

if TYPE_CHECKING:
    import torch

__all__ = ["GenerationLoop", "Sampling", "SequenceResult", "TokenSink"]

logger = logging.getLogger("mnemos.runtime.batching")

#: Why a sequence stopped decoding: an end-of-text token, its token budget, or its sink
#: asked (a stop string, cancellation, a failed stream).
EndedBy = Literal["eos", "length", "stopped"]


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: greedy when ``temperature`` is 0 or unset.

    Unset ``top_p``/``top_k`` mean no filtering (as in vLLM), not transformers' top_k=50.
    """

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


class TokenSink(Protocol):
    """Where one request's tokens go; called from the generation thread only."""

    def on_tokens(self, ids: list[int], *, final: bool = False) -> None:
        """New token ids (one per step); ``final`` (with no ids) once the sequence ended."""

    def should_stop(self) -> bool:
        """Polled before every step: true ends the sequence (stop string, cancellation)."""


@dataclass(frozen=True)
class SequenceResult:
    """What one request's generation produced, for the runtime to build its output from."""

    prompt_tokens: int
    token_ids: list[int]
    ended_by: EndedBy
    #: ``time.perf_counter()`` when the request was admitted (its prefill began), when its
    #: first token was picked, and when it ended.
    started: float
    first_token_at: float | None
    finished: float


@dataclass
class _Request:
    """A submitted request waiting for a place in the batch."""

    prompt: str
    sampling: Sampling
    sink: TokenSink
    job_id: str
    future: concurrent.futures.Future[SequenceResult] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Sequence:
    """An admitted request while it decodes (generation thread only)."""

    request: _Request
    prompt_tokens: int
    max_new_tokens: int
    generator: torch.Generator | None
    started: float
    #: Tokens in the KV cache: the prompt and every generated token but the newest, which
    #: is fed to the next step (and is the next position id).
    cached: int
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None


class _Forward:
    """The model's forward pass, called with the argument names its transformers uses.

    transformers 5 calls the cache ``cache``; earlier releases ``past_key_values``. Only
    the last position's logits are computed where the model allows it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.positions = "position_ids" in params
        self.keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    def __call__(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """(logits of the last position, shape [batch, vocab]; the updated cache)."""
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "use_cache": True,
            self.cache_arg: cache,
        }
        if self.positions:
            kwargs["position_ids"] = positions
        if self.keep_arg is not None:
            kwargs[self.keep_arg] = 1
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :], new_cache


class _Batch:
    """The active sequences and their shared, left-padded KV cache (generation thread only).

    ``mask`` is [rows, cached columns]: 0 over each row's left padding, 1 over its tokens;
    it lives on ``device``, with the model's inputs.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[_Sequence] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    def add(self, seq: _Sequence, cache: Any) -> None:
        """Append ``seq`` with its own (batch 1, unpadded) cache as the last row."""
        import torch
        import torch.nn.functional as F

        length = seq.cached
        if not self.rows:
            self.rows, self.cache = [seq], cache
            self.mask = torch.ones((1, length), dtype=torch.long, device=self.device)
            return
        assert self.mask is not None
        width = int(self.mask.shape[1])
        if length > width:
            for layer in self.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, length - width, 0))
                layer.values = F.pad(layer.values, (0, 0, length - width, 0))
            self.mask = F.pad(self.mask, (length - width, 0))
            width = length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, F.pad(theirs.keys, (0, 0, width - length, 0))], dim=0)
            mine.values = torch.cat([mine.values, F.pad(theirs.values, (0, 0, width - length, 0))], dim=0)
        row = F.pad(torch.ones((1, length), dtype=self.mask.dtype, device=self.mask.device), (width - length, 0))
        self.mask = torch.cat([self.mask, row], dim=0)
        self.rows.append(seq)

    def remove(self, done: Iterable[int]) -> None:
        """Drop the rows at indices ``done`` and the leading columns only they needed."""
        import torch

        gone = set(done)
        if not gone:
            return
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.clear()
            return
        assert self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        lead = int(mask.argmax(dim=1).min())  # first column any remaining row uses
        self.mask = mask[:, lead:]
        for layer in self.cache.layers:
            rows = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, rows)[..., lead:, :]
            layer.values = layer.values.index_select(0, rows)[..., lead:, :]
        self.rows = [self.rows[i] for i in keep]

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None


def _generation_error(e: BaseException) -> MnemosError:
    """The error a request failed by ``e`` reports (out of GPU memory may succeed again)."""
    import torch

    if isinstance(e, MnemosError):
        return e
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return ExecutionError(f"out of GPU memory while generating: {e}", retryable=True)
    return ExecutionError(f"generation failed: {type(e).__name__}: {e}")


def _fail(future: concurrent.futures.Future[SequenceResult], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class GenerationLoop:
    """Runs every generation of one loaded model on one thread, batching the active ones.

    :meth:`submit` is called from any thread (the event loop) and returns a future the
    thread resolves; the thread starts on the first request (and again after a crash)
    and ends when :meth:`close` is called and nothing is left to do.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        *,
        name: str,
        max_batch_size: int = 1,
        max_positions: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.max_positions = max_positions
        self._forward = _Forward(model)
        self._eos_ids = _eos_ids(model, tokenizer)
        #: Sequences decoded together at most (1 where the model's cache cannot be batched).
        self.max_batch_size = max_batch_size if max_batch_size == 1 or self._can_batch() else 1
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread

    def submit(self, prompt: str, sampling: Sampling, sink: TokenSink, *, job_id: str) -> concurrent.futures.Future[
        SequenceResult
    ]:
        """Queue one generation; it joins the batch at the next step with room."""
        request = _Request(prompt=prompt, sampling=sampling, sink=sink, job_id=job_id)
        with self._cond:
            if self._closed:
                raise ExecutionError(f"{self.name} is unloaded", retryable=True)
            self._pending.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._main, name=f"mnemos-generate-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request.future

    def close(self) -> None:
        """Take no more requests, let the thread finish those it has, and wait for it
        (blocking: call it in a thread). Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.model = self.tokenizer = None
        self._forward.model = None

    # ------------------------------------------------------------------ generation thread

    def _main(self) -> None:
        import torch

        logger.debug("generation loop of %s started (batches of up to %d)", self.name, self.max_batch_size)
        batch = _Batch(self.device)
        new: list[_Request] = []
        try:
            with torch.inference_mode():
                while True:
                    taken = self._take(len(batch.rows))
                    if taken is None:
                        break
                    new = taken
                    for request in new:
                        self._admit(request, batch)
                    stopped = [i for i, seq in enumerate(batch.rows) if seq.request.sink.should_stop()]
                    self._retire(batch, dict.fromkeys(stopped, "stopped"))
                    if batch.rows:
                        self._step(batch)
        except BaseException as e:
            with self._cond:
                # From here on a new request starts a new thread; the ones already queued
                # fail with the ones in the batch.
                pending = list(self._pending)
                self._pending.clear()
                self._thread = None
            failed = [s.request for s in batch.rows] + [r for r in new if not r.future.done()] + pending
            logger.exception("generation loop of %s crashed; failing jobs %s (the next request restarts it)",
                             self.name, ", ".join(r.job_id for r in failed) or "none")
            for request in failed:
                _fail(request.future, ExecutionError(
                    f"the generation loop of {self.name} crashed: {type(e).__name__}: {e}", retryable=True))
            batch.clear()
            return
        logger.debug("generation loop of %s stopped", self.name)

    def _take(self, active: int) -> list[_Request] | None:
        """Requests to admit now (waiting while there is nothing to do); None: closed and idle."""
        with self._cond:
            while not self._pending and active == 0:
                if self._closed:
                    return None
                self._cond.wait()
            room = max(0, self.max_batch_size - active)
            return [self._pending.popleft() for _ in range(min(room, len(self._pending)))]

    def _admit(self, request: _Request, batch: _Batch) -> None:
        """Tokenize and prefill one request alone, pick its first token, and add it to the batch."""
        import torch

        if not request.future.set_running_or_notify_cancel():
            return
        try:
            ids = [int(t) for t in self.tokenizer(request.prompt)["input_ids"]]
            if not ids:
                raise ValidationFailed("the prompt encodes to no tokens")
            budget = request.sampling.max_new_tokens
            if self.max_positions is not None:
                room = self.max_positions - len(ids)
                if room <= 0:
                    raise ValidationFailed(f"prompt has {len(ids)} tokens; the model's context is {self.max_positions}")
                budget = min(budget, room)
            generator = None
            if not request.sampling.greedy and request.sampling.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
            seq = _Sequence(request=request, prompt_tokens=len(ids), max_new_tokens=budget, generator=generator,
                            started=time.perf_counter(), cached=len(ids))
            if request.sink.should_stop():
                self._finish(seq, "stopped")
                return
            input_ids = torch.tensor([ids], device=self.device)
            positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
            logits, cache = self._forward(input_ids, torch.ones_like(input_ids), positions, None)
        except Exception as e:  # noqa: BLE001 - this request fails; the batch goes on
            _fail(request.future, _generation_error(e))
            return
        ended = self._advance([seq], logits)
        if ended:
            self._end(seq, ended[0])
        else:
            batch.add(seq, cache)

    def _step(self, batch: _Batch) -> None:
        """One forward pass for every active sequence: each gets its next token."""
        import torch
        import torch.nn.functional as F

        rows = batch.rows
        assert batch.mask is not None
        try:
            input_ids = torch.tensor([[s.token_ids[-1]] for s in rows], device=self.device)
            positions = torch.tensor([[s.cached] for s in rows], device=self.device)
            mask = F.pad(batch.mask, (0, 1), value=1)
            logits, cache = self._forward(input_ids, mask, positions, batch.cache)
        except Exception as e:  # noqa: BLE001 - which row caused it is unknown: all of them fail
            logger.warning("%s: a decoding step failed (%s: %s); failing jobs %s", self.name, type(e).__name__, e,
                           ", ".join(s.request.job_id for s in rows))
            for s in rows:
                _fail(s.request.future, _generation_error(e))
            batch.clear()
            return
        batch.cache, batch.mask = cache, mask
        for s in rows:
            s.cached += 1
        self._retire(batch, self._advance(rows, logits))

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor) -> dict[int, EndedBy | BaseException]:
        """Pick and stream each row's next token; the rows that ended (or failed), by index."""
        greedy: list[int] = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        ended: dict[int, EndedBy | BaseException] = {}
        for i, seq in enumerate(rows):
            sampling = seq.request.sampling
            try:
                token = greedy[i] if sampling.greedy else _sample(logits[i], sampling, seq.generator)
                seq.token_ids.append(token)
                if seq.first_token_at is None:
                    seq.first_token_at = now
                seq.request.sink.on_tokens([token])
            except Exception as e:  # noqa: BLE001 - fails this request only
                ended[i] = e
                continue
            if token in self._eos_ids:
                ended[i] = "eos"
            elif len(seq.token_ids) >= seq.max_new_tokens:
                ended[i] = "length"
        return ended

    def _retire(self, batch: _Batch, ended: dict[int, EndedBy | BaseException]) -> None:
        """End the rows at the indices of ``ended`` and drop them from the batch."""
        for i, why in ended.items():
            self._end(batch.rows[i], why)
        batch.remove(ended)

    def _end(self, seq: _Sequence, why: EndedBy | BaseException) -> None:
        if isinstance(why, BaseException):
            _fail(seq.request.future, _generation_error(why))
        else:
            self._finish(seq, why)

    def _finish(self, seq: _Sequence, ended_by: EndedBy) -> None:
        """Flush the sequence's stream and resolve its future."""
        try:
            seq.request.sink.on_tokens([], final=True)
        except Exception as e:  # noqa: BLE001 - fails this request only
            _fail(seq.request.future, _generation_error(e))
            return
        seq.request.future.set_result(SequenceResult(
            prompt_tokens=seq.prompt_tokens,
            token_ids=seq.token_ids,
            ended_by=ended_by,
            started=seq.started,
            first_token_at=seq.first_token_at,
            finished=time.perf_counter(),
        ))

    def _can_batch(self) -> bool:
        """Whether the model's cache is one this loop can merge and split (a one-token probe)."""
        import torch

        try:
            from transformers.cache_utils import DynamicCache, DynamicLayer
        except ImportError:
            return False
        token = self._eos_ids[0] if self._eos_ids else 0
        try:
            with torch.inference_mode():
                ids = torch.tensor([[token]], device=self.device)
                _, cache = self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), None)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            logger.warning("%s: a probe forward pass failed (%s: %s); generating one sequence at a time",
                           self.name, type(e).__name__, e)
            return False
        layers: list[Any] = list(getattr(cache, "layers", None) or [])
        ok = isinstance(cache, DynamicCache) and bool(layers) and all(
            type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        if not ok:
            logger.warning("%s: its KV cache (%s) cannot be batched here; generating one sequence at a time",
                           self.name, type(cache).__name__)
        return ok


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Token ids that end a generation: the model's generation config's and the tokenizer's."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates: list[Any] = configured if isinstance(configured, list) else [configured]
    for value in [*candidates, tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return tuple(ids)


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from one row's logits: temperature, then top-k, then top-p (transformers'
    order), then a draw with the request's generator (the global one when unseeded)."""
    import torch

    assert sampling.temperature
    scores = logits.float() / sampling.temperature
    top_k = sampling.top_k or 0
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = sampling.top_p if sampling.top_p is not None else 1.0
    if top_p < 1.0:
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
