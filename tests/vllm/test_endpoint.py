"""metis.profiler_endpoint: config parsing and the unreachable-endpoint path (no server needed;
the live path is in test_integration.py against a real vLLM server)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from ragserve.config import Config, VllmConfig, VllmEndpoint
from ragserve.engines.vllm.endpoint import EndpointGenerator
from ragserve.errors import ConfigError
from ragserve.metis.llm_profiler import ProfilePromptBuilder, run_llm_profiler
from ragserve.metis.profile import ProfileSource


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_profiler_endpoint_parses_from_config():
    config = Config.from_dict({"metis": {"profiler_endpoint": {"base_url": "http://127.0.0.1:8001",
                                                               "model": "qwen"}}})
    assert config.metis.profiler_endpoint == VllmEndpoint("http://127.0.0.1:8001", "qwen")
    assert Config().metis.profiler_endpoint is None


def test_profiler_endpoint_without_a_model_names_the_key():
    with pytest.raises(ConfigError, match="metis.profiler_endpoint.*needs base_url and model"):
        Config.from_dict({"metis": {"profiler_endpoint": {"base_url": "http://127.0.0.1:8001"}}})


def test_profiler_endpoint_down_gives_the_fallback_profile():
    async def run():
        gen = EndpointGenerator(VllmEndpoint(f"http://127.0.0.1:{closed_port()}", "smollm2"),
                                VllmConfig(max_retries=0, connect_timeout_s=1.0))
        try:
            return await run_llm_profiler(gen, ProfilePromptBuilder("docs", 256), "Who wrote Dracula?")
        finally:
            await gen.close()

    assert asyncio.run(run()).source is ProfileSource.FALLBACK
