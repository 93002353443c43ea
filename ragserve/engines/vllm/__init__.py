"""vLLM backend: the Engine protocol over one or more OpenAI-compatible vLLM servers.

    client.py   one endpoint: streamed chat/completions, retries, /tokenize, /metrics, /health
    metrics.py  Prometheus text -> VllmLoad -> EngineStats (pure)
    router.py   replica set: background scrapes, health, most-free-KV routing, failover
    lmcache.py  CacheBlend prompt layout for LMCache-blending GPU servers (pure)
    engine.py   VllmEngine (what build_runtime constructs for engine.backend = vllm)

Torch-free. See docs/vllm.md for configuration and the dev server script.
"""
from ragserve.engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine"]
