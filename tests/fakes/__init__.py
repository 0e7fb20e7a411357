"""Fakes for parts that cannot run here (a GPU engine); each honours the real interface."""

from tests.fakes.fake_vllm import (
    FakeAsyncEngineArgs,
    FakeAsyncLLMEngine,
    FakeCompletionOutput,
    FakeRequestOutput,
    FakeSamplingParams,
)

__all__ = [
    "FakeAsyncEngineArgs",
    "FakeAsyncLLMEngine",
    "FakeCompletionOutput",
    "FakeRequestOutput",
    "FakeSamplingParams",
]
