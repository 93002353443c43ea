"""The engine protocol: what the controller needs from anything that runs LLM calls.

Engines own execution only. They never choose plans; they report load through
`stats()` and run what they are given. The embedded engine (`engines/local`) and the
vLLM client (`engines/vllm`) both implement this.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol, Sequence, runtime_checkable

from ragserve.domain import EngineStats, LLMCall, LLMResult, ModelSpec


@runtime_checkable
class Engine(Protocol):
    model: ModelSpec

    async def generate(self, calls: Sequence[LLMCall]) -> list[LLMResult]:
        """Run `calls` and return their results in order.

        Calls submitted together are a fan-out (map / rerank): the engine runs them as
        one batch when they fit. Calls that do not fit the KV budget wait; none is dropped.
        """
        ...

    def stream(self, call: LLMCall) -> AsyncIterator[str]:
        """Yield the text of one call piece by piece as tokens are decoded."""
        ...

    async def stream_result(self, call: LLMCall) -> tuple[AsyncIterator[str], asyncio.Future]:
        """Start one call; returns its text pieces as they decode and the future of its final
        `LLMResult` (which re-raises a failure). Cancelling the future stops the call."""
        ...

    def stats(self) -> EngineStats:
        """A current load snapshot. Cheap; called before every scheduling decision."""
        ...

    def count_tokens(self, text: str) -> int:
        """Exact token count of `text` in the serving model's tokenizer."""
        ...

    def prompt_tokens(self, call: LLMCall) -> int:
        """Exact prompt length of `call` after the chat template."""
        ...

    async def close(self) -> None:
        ...
