"""A bare OpenAI-compatible chat endpoint as a generator of LLM calls (no load, no routing).

For work beside the serving engine that only needs `generate`, such as the METIS profiler on
a larger model (`metis.profiler_endpoint`). It reuses `VllmClient`'s streaming, log-probs and
retries, so any server speaking /v1/chat/completions works, vLLM or not (no /metrics needed).
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from ragserve.config import VllmConfig, VllmEndpoint
from ragserve.domain import LLMCall, LLMResult
from ragserve.engines.vllm.client import VllmClient


class EndpointGenerator:
    def __init__(self, endpoint: VllmEndpoint, config: VllmConfig | None = None) -> None:
        self.client = VllmClient(endpoint, config or VllmConfig())

    async def generate(self, calls: Sequence[LLMCall]) -> list[LLMResult]:
        """Results in call order; an unreachable endpoint raises EngineUnavailable
        (`EndpointFailed`), which the profiler turns into its fallback profile."""
        return list(await asyncio.gather(*(self.client.run(call) for call in calls)))

    async def close(self) -> None:
        await self.client.aclose()
