"""`VllmEngine`: the Engine protocol over one or more vLLM servers.

Who owns what: the engine adapts the protocol (generate / stream / stats / token counts)
to the replica set (router.py), which routes and fails over; each endpoint's `VllmClient`
(client.py) speaks HTTP; `metrics.py` turns /metrics into the load snapshot; `lmcache.py`
lays out prompts for endpoints that run LMCache blending.

Construction is synchronous (the controller and METIS planner are built synchronously and
call `stats()` / `prompt_tokens()` at once): it scrapes every endpoint, reads /v1/models for
the context limit and resolves the model's KV shape (`model_spec`). The background monitor
starts on the first call made from an event loop.

Differences from the embedded engine: `queue_s` is 0 (vLLM does not report a request's
queue time; it is inside `ttft_s`); `output_tokens` is vLLM's completion count, which
includes the EOS token when the call stopped on it; KV "used" counts allocated blocks, not
reservations (vLLM allocates as tokens decode), plus an estimate (prompt + max_tokens) of
our calls the last scrape does not show yet (see router.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from ragserve.config import EngineConfig, VllmConfig, cache_dir
from ragserve.domain import EngineSpeeds, EngineStats, LLMCall, LLMResult, ModelSpec
from ragserve.engines.speeds import SpeedTracker
from ragserve.engines.vllm import lmcache
from ragserve.engines.vllm.client import EndpointFailed, ServedModel, VllmClient
from ragserve.engines.vllm.router import Replica, ReplicaSet
from ragserve.errors import ConfigError, EngineUnavailable

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}


class VllmEngine:
    """Implements `ragserve.engines.base.Engine` against vLLM's OpenAI-compatible servers."""

    def __init__(self, config: VllmConfig, engine_config: EngineConfig | None = None, *,
                 clients: Sequence[VllmClient] | None = None) -> None:
        if not config.endpoints and clients is None:
            raise ConfigError("engine.backend is 'vllm' but vllm.endpoints is empty; add at least one "
                              "{base_url, model} (see docs/vllm.md)")
        self.config = config
        self.engine_config = engine_config or EngineConfig()
        self.clients = list(clients) if clients is not None else [VllmClient(ep, config) for ep in config.endpoints]
        self.replicas = ReplicaSet(self.clients, config)
        self.replicas.refresh_sync()
        healthy = [r for r in self.replicas.replicas if r.healthy]
        if not healthy:
            raise EngineUnavailable(self.replicas.unavailable_message())
        self.model: ModelSpec = model_spec(config, healthy)
        self.replicas.kv_bytes_per_token = self.model.kv_bytes_per_token
        self._blend_frames: dict[tuple[str, tuple], tuple[list[int], list[int]]] = {}
        # Measured from our own calls' timings (vLLM's /metrics histograms are cumulative over
        # every tenant; our calls are what the plans we price will look like).
        self.speeds = SpeedTracker(EngineSpeeds(prefill_tok_s=2000.0, step_base_s=0.05, step_per_row_s=0.002))
        self._last_rows = 1
        logger.info("vLLM engine: %d endpoint(s), %d healthy; model %s (%d layers, %d KV heads x %d, %d B), "
                    "context %d", len(self.clients), len(healthy), self.model.name, self.model.num_layers,
                    self.model.num_kv_heads, self.model.head_dim, self.model.dtype_bytes, self.model.max_context)

    # -- Engine protocol ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        stats = self.replicas.stats()
        self._last_rows = max(1, stats.num_running)
        return replace(stats, speeds=self.speeds.speeds())

    def _measure(self, call: LLMCall, result: LLMResult) -> None:
        """Prefill ~ first-token time after admission; a decode step ~ the time between tokens,
        at the batch size the last snapshot saw."""
        prefill_s = result.ttft_s - result.queue_s
        if prefill_s > 0:
            self.speeds.record_prefill(result.prompt_tokens, prefill_s)
        if result.output_tokens > 1:
            step_s = (result.total_s - result.ttft_s) / (result.output_tokens - 1)
            self.speeds.record_step(self._last_rows, step_s)
        self.speeds.record_output(call.tag, result.output_tokens)

    def count_tokens(self, text: str) -> int:
        return self._sync(lambda c: c.count_text_tokens(text))

    def prompt_tokens(self, call: LLMCall) -> int:
        return self._sync(lambda c: c.count_chat_tokens(tuple(call.messages)))

    async def generate(self, calls: Sequence[LLMCall]) -> list[LLMResult]:
        if not calls:
            return []
        self.replicas.ensure_monitor()
        return await self.replicas.run_batch(calls, self._runner())

    async def stream(self, call: LLMCall) -> AsyncIterator[str]:
        pieces, result = await self.stream_result(call)
        async for piece in pieces:
            yield piece
        await result   # re-raises a failure

    async def stream_result(self, call: LLMCall) -> tuple[AsyncIterator[str], asyncio.Future]:
        """Like `stream`, but also hands back the future of the final `LLMResult`.
        Cancelling the future aborts the request on the server (the connection closes)."""
        self.replicas.ensure_monitor()
        await self.replicas.refresh_if_stale()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.ensure_future(self.replicas.run_call(call, self._runner(queue.put_nowait)))
        task.add_done_callback(lambda _: queue.put_nowait(None))

        async def pieces() -> AsyncIterator[str]:
            while (piece := await queue.get()) is not None:
                yield piece
        return pieces(), task

    async def close(self) -> None:
        await self.replicas.close()
        for c in self.clients:
            await c.aclose()

    # -- pieces ---------------------------------------------------------------------------
    def _runner(self, on_piece=None):
        async def run(replica: Replica, call: LLMCall, max_retries: int | None, on_first) -> LLMResult:
            prompt_ids = None
            if replica.client.endpoint.lmcache_blend and call.chunk_ids:
                prompt_ids = await asyncio.to_thread(self._blend_ids, replica.client, call)
            result = await replica.client.run(call, on_piece, max_retries=max_retries, prompt_ids=prompt_ids,
                                              on_first_token=on_first)
            self._measure(call, result)
            return result
        return run

    def _sync(self, fn):
        """Run a sync request on the best healthy replica, falling back to the others."""
        errors = []
        order = sorted(self.replicas.replicas, key=lambda r: not r.healthy)
        for r in order:
            try:
                return fn(r.client)
            except EndpointFailed as exc:
                r.mark_down(str(exc))
                errors.append(str(exc))
        raise EngineUnavailable("token counting failed on every vLLM endpoint: " + "; ".join(errors))

    def _blend_ids(self, client: VllmClient, call: LLMCall) -> list[int] | None:
        """The LMCache blend layout of `call` as token ids, or None to send it as chat."""
        if not call.messages or call.messages[-1][0] != "user":
            return None
        layout = lmcache.context_layout(call)
        if layout is None:
            return None
        frame = self._frame(client, call)
        if frame is None:
            return None
        head, tail = frame
        sep = lmcache.separator_ids(client.tokenize(client.endpoint.blend_special_str, True))
        chunks = [client.tokenize(p) for p in layout.passages]
        if any(lmcache.contains(c, sep) for c in chunks):
            return None   # a passage holding the separator would be cut in two by LMCache
        return lmcache.blend_prompt(head + list(client.tokenize(layout.head)), chunks,
                                    list(client.tokenize(layout.tail)) + tail, sep)

    def _frame(self, client: VllmClient, call: LLMCall) -> tuple[list[int], list[int]] | None:
        """Chat-template ids around the last user message, cached per preceding messages."""
        key = (client.base_url, tuple(call.messages[:-1]))
        if key not in self._blend_frames:
            user = call.messages[-1][1]
            full = client.tokenize_chat(call.messages)
            empty = client.tokenize_chat(tuple(call.messages[:-1]) + (("user", ""),))
            head, tail = lmcache.chat_frame(full, empty)
            if list(full[len(head):len(full) - len(tail)]) != list(client.tokenize(user)):
                logger.info("LMCache blend: the chat template merges tokens across the user message; "
                            "sending chat requests unblended")
                return None
            self._blend_frames[key] = (head, tail)
        return self._blend_frames[key]


# -- the served model's shape ---------------------------------------------------------------
def model_spec(config: VllmConfig, replicas: Sequence[Replica]) -> ModelSpec:
    """ModelSpec of the served model: context from /v1/models (smallest over endpoints), KV
    shape from config overrides, else the model's config.json (see VllmConfig.hf_config)."""
    served: list[ServedModel] = []
    for r in replicas:
        models = r.client.models()
        match = [m for m in models if m.id == r.client.endpoint.model]
        if not match:
            raise ConfigError(f"vllm endpoint {r.base_url} does not serve model {r.client.endpoint.model!r}; "
                              f"it serves: {', '.join(m.id for m in models) or 'nothing'}")
        served.append(match[0])
    name = replicas[0].client.endpoint.model
    need_file = None in (config.num_layers, config.num_kv_heads, config.head_dim)
    hf = _hf_config(config, served[0], name) if need_file else {}
    heads = hf.get("num_attention_heads") or 1
    layers = config.num_layers or int(hf["num_hidden_layers"])
    kv_heads = config.num_kv_heads or int(hf.get("num_key_value_heads") or heads)
    head_dim = config.head_dim or int(hf.get("head_dim") or hf["hidden_size"] // heads)
    dtype_bytes = config.dtype_bytes or _kv_dtype_bytes(replicas, 2 * layers * kv_heads * head_dim, hf)
    max_context = min(m.max_model_len for m in served if m.max_model_len) if any(
        m.max_model_len for m in served) else 4096
    return ModelSpec(name=name, num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                     dtype_bytes=dtype_bytes, max_context=max_context)


def _kv_dtype_bytes(replicas: Sequence[Replica], values_per_token: int, hf: dict[str, Any]) -> int:
    for r in replicas:
        per_token = r.load.kv_bytes_per_token if r.load else None
        if per_token and values_per_token:
            measured = per_token / values_per_token
            for size in (4, 2, 1):
                if abs(measured - size) < 0.25 * size:
                    return size
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPE_BYTES.get(dtype, 2)


def _hf_config(config: VllmConfig, served: ServedModel, name: str) -> dict[str, Any]:
    candidates: list[Path] = []
    if config.hf_config:
        candidates.append(Path(config.hf_config))
    candidates.append(Path(served.root))
    for key in {name, Path(served.root).name}:
        candidates.append(cache_dir() / "models" / key)
    for path in candidates:
        file = path / "config.json" if path.is_dir() else path
        if file.is_file() and file.name.endswith(".json"):
            data = json.loads(file.read_text())
            data = {**data.get("text_config", {}), **data}   # multimodal configs nest the LM's
            if "num_hidden_layers" in data:
                return data
    registry = _registry_config(name)
    if registry is not None:
        return registry
    raise ConfigError(f"cannot find config.json of served model {name!r} (root {served.root!r}) for its KV "
                      "shape; set vllm.hf_config to a local copy, or vllm.num_layers, vllm.num_kv_heads "
                      "and vllm.head_dim")


def _registry_config(name: str) -> dict[str, Any] | None:
    """config.json of a ragserve registry model (converted on first use, as for local serving)."""
    from ragserve.engines.local.models import REGISTRY, model_dir

    if name not in REGISTRY:
        return None
    try:
        return json.loads((model_dir(name) / "config.json").read_text())
    except Exception as exc:   # conversion needs the local extra
        logger.warning("could not prepare registry model %s for its config: %s", name, exc)
        return None
