"""HTTP client of one vLLM server (OpenAI-compatible API plus /tokenize, /metrics, /health).

Who owns what: this module talks to one endpoint and turns one `LLMCall` into one
`LLMResult`; the router (router.py) picks the endpoint and fails over between them.

A call is always sent with `stream=True`, whether or not its caller streams: the first
chunk that carries text (or the finish) stamps `ttft_s` exactly, and the client knows
whether any token has arrived when a connection breaks. Retries (bounded, exponential
backoff) cover connection errors and 429/5xx answers, and only while nothing has been
returned to the caller: a streamed call (`on_piece`) is never retried once a piece went
out; a buffered call (`generate`) may be re-run from scratch after a break, since its
partial text never left the client (`VllmConfig.retry_buffered`). A timeout is not retried:
the server is alive but slow, and a second copy would only add load.

Token counts come from the server's /tokenize (exact for its tokenizer and chat template)
through a sync `httpx.Client`, because the engine protocol's `count_tokens` and
`prompt_tokens` are synchronous; results are LRU-cached.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from ragserve.config import VllmConfig, VllmEndpoint
from ragserve.domain import LLMCall, LLMResult
from ragserve.engines.vllm.metrics import VllmLoad, parse_load
from ragserve.errors import BadInput, ConfigError, EngineDead, EngineUnavailable

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 4.0
TOKENIZE_CACHE_SIZE = 8192


class EndpointFailed(EngineUnavailable):
    """A call failed on one endpoint. `streamed`: pieces had reached the caller, so it must
    not be retried anywhere; `endpoint_down`: the endpoint looks unreachable (the router
    takes it out until a health check passes)."""

    def __init__(self, message: str, *, base_url: str, streamed: bool = False,
                 endpoint_down: bool = True) -> None:
        super().__init__(message)
        self.base_url = base_url
        self.streamed = streamed
        self.endpoint_down = endpoint_down


class _Retryable(Exception):
    """Internal: one attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of GET /v1/models."""

    id: str
    max_model_len: int
    root: str   # the path or hub id the server loaded


@dataclass
class _Attempt:
    """What one streamed response has produced so far."""

    submit_t: float
    first_t: float = 0.0
    text: str = ""
    logprobs: list[float] | None = None
    finish: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    pieces_sent: int = 0
    on_first: Callable[[], None] | None = None


class VllmClient:
    """Async calls plus sync token counting against one `VllmEndpoint`."""

    def __init__(self, endpoint: VllmEndpoint, config: VllmConfig | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sync_transport: httpx.BaseTransport | None = None) -> None:
        self.endpoint = endpoint
        self.config = config or VllmConfig()
        self.base_url = endpoint.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._timeout = httpx.Timeout(self.config.timeout_s, connect=self.config.connect_timeout_s)
        self._transport = transport
        self._aclients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._sync = httpx.Client(base_url=self.base_url, headers=self._headers, transport=sync_transport,
                                  timeout=httpx.Timeout(self.config.scrape_timeout_s * 4,
                                                        connect=self.config.connect_timeout_s))
        self.count_text_tokens = functools.lru_cache(TOKENIZE_CACHE_SIZE)(self._count_text)
        self.count_chat_tokens = functools.lru_cache(TOKENIZE_CACHE_SIZE)(self._count_chat)
        self._text_ids = functools.lru_cache(TOKENIZE_CACHE_SIZE)(self._tokenize_sync)

    def __repr__(self) -> str:
        return f"VllmClient({self.base_url}, model={self.endpoint.model!r})"

    # -- the async client, one per event loop (an httpx pool is bound to its loop) ---------
    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            for old in [lp for lp in self._aclients if lp.is_closed()]:
                del self._aclients[old]   # its loop is gone; nothing left to close cleanly
            client = self._aclients[loop] = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                transport=self._transport, limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        return client

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._aclients.pop(loop, None)
        if client is not None:
            await client.aclose()
        self._sync.close()

    # -- generation ---------------------------------------------------------------------------
    async def run(self, call: LLMCall, on_piece: Callable[[str], None] | None = None, *,
                  max_retries: int | None = None, prompt_ids: Sequence[int] | None = None,
                  on_first_token: Callable[[], None] | None = None) -> LLMResult:
        """Run `call`; `on_piece` receives text pieces as they decode (a streamed call);
        `on_first_token` is called once, when the first token (or the finish) arrives.

        `prompt_ids`: send these token ids to /v1/completions instead of the chat messages
        (the LMCache blend layout). Raises BadInput for a request the server rejects (too
        long, bad parameter), EndpointFailed when the endpoint cannot serve it."""
        if call.max_tokens < 1:
            raise BadInput(f"max_tokens must be >= 1, got {call.max_tokens}")
        retries = self.config.max_retries if max_retries is None else max_retries
        submit_t = time.perf_counter()
        body = self._body(call, prompt_ids)
        path = "/v1/completions" if prompt_ids is not None else "/v1/chat/completions"
        attempt = 0
        while True:
            state = _Attempt(submit_t=submit_t, logprobs=[] if call.logprobs else None,
                             on_first=on_first_token)
            try:
                await asyncio.wait_for(self._stream(path, body, state, on_piece), self.config.timeout_s)
                return self._result(call, state)
            except asyncio.TimeoutError:
                raise EndpointFailed(f"vLLM call ({call.tag or 'llm'}) to {self.base_url} timed out after "
                                     f"{self.config.timeout_s:.0f} s (vllm.timeout_s); the server is overloaded "
                                     "or the call is too long", base_url=self.base_url,
                                     streamed=state.pieces_sent > 0, endpoint_down=False) from None
            except _Retryable as exc:
                streamed = state.pieces_sent > 0
                partial = bool(state.first_t) and not self.config.retry_buffered
                if streamed or partial or attempt >= retries:
                    what = "after streaming began" if streamed or partial else f"after {attempt + 1} attempt(s)"
                    raise EndpointFailed(f"vLLM endpoint {self.base_url} failed {what}: {exc}",
                                         base_url=self.base_url, streamed=streamed) from None
                delay = min(MAX_BACKOFF_S, self.config.retry_backoff_s * 2 ** attempt) * (1 + 0.25 * random.random())
                logger.warning("vLLM %s: %s; retry %d/%d in %.2fs", self.base_url, exc, attempt + 1, retries, delay)
                attempt += 1
                await asyncio.sleep(delay)

    def _body(self, call: LLMCall, prompt_ids: Sequence[int] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.endpoint.model, "max_tokens": call.max_tokens,
                                "temperature": call.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if call.stop:
            body["stop"] = list(call.stop)
        if prompt_ids is not None:
            body["prompt"] = list(prompt_ids)
            if call.logprobs:
                body["logprobs"] = 1          # completions API: top-k count; the sampled token's is included
        else:
            body["messages"] = [{"role": r, "content": c} for r, c in call.messages]
            if call.logprobs:
                body["logprobs"] = True
        return body

    async def _stream(self, path: str, body: dict[str, Any], state: _Attempt,
                      on_piece: Callable[[str], None] | None) -> None:
        try:
            async with self._aclient().stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_status(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._on_chunk(json.loads(data), state, on_piece)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError,
                httpx.ReadError, httpx.WriteError) as exc:
            raise _Retryable(_describe_http(exc)) from None
        except httpx.ReadTimeout:
            raise asyncio.TimeoutError from None
        if not state.finish:
            raise _Retryable("the response stream ended without a finish_reason")

    def _raise_status(self, response: httpx.Response) -> None:
        status = response.status_code
        detail = _error_message(response)
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}: {detail}")
        if status in (401, 403):
            raise EngineDead(f"vLLM endpoint {self.base_url} refused the API key (HTTP {status}); "
                             "set vllm.endpoints[].api_key to the server's --api-key")
        if status == 404:
            raise ConfigError(f"vLLM endpoint {self.base_url} answered 404 ({detail}); check "
                              f"vllm.endpoints[].model={self.endpoint.model!r} against its /v1/models")
        raise BadInput(f"vLLM endpoint {self.base_url} rejected the call (HTTP {status}): {detail}")

    def _on_chunk(self, chunk: dict[str, Any], state: _Attempt, on_piece: Callable[[str], None] | None) -> None:
        if "error" in chunk and not chunk.get("choices"):
            raise _Retryable(f"server error in stream: {_describe(chunk['error'])}")
        usage = chunk.get("usage")
        if usage:
            state.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            state.output_tokens = int(usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            piece = (delta.get("content") if delta is not None else choice.get("text")) or ""
            if (piece or choice.get("finish_reason")) and not state.first_t:
                state.first_t = time.perf_counter()
                if state.on_first is not None:
                    state.on_first()
            if state.logprobs is not None:
                state.logprobs.extend(_logprobs(choice.get("logprobs")))
            if piece:
                state.text += piece
                if on_piece is not None:
                    on_piece(piece)
                    state.pieces_sent += 1
            if choice.get("finish_reason"):
                state.finish = choice["finish_reason"]

    def _result(self, call: LLMCall, state: _Attempt) -> LLMResult:
        end = time.perf_counter()
        return LLMResult(text=state.text.strip(), prompt_tokens=state.prompt_tokens,
                         output_tokens=state.output_tokens, ttft_s=(state.first_t or end) - state.submit_t,
                         total_s=end - state.submit_t, queue_s=0.0,
                         token_logprobs=tuple(state.logprobs) if state.logprobs is not None else (),
                         finish_reason="length" if state.finish == "length" else "stop")

    # -- load and health --------------------------------------------------------------------
    async def scrape(self) -> VllmLoad:
        """GET /metrics -> load. Raises EndpointFailed when unreachable, MetricsError when the
        page lacks the vLLM metrics."""
        try:
            r = await self._aclient().get("/metrics", timeout=self.config.scrape_timeout_s)
        except httpx.HTTPError as exc:
            raise EndpointFailed(f"scrape of {self.base_url}/metrics failed: {_describe_http(exc)}",
                                 base_url=self.base_url) from None
        return self._parse_metrics(r)

    def scrape_sync(self) -> VllmLoad:
        try:
            r = self._sync.get("/metrics", timeout=self.config.scrape_timeout_s)
        except httpx.HTTPError as exc:
            raise EndpointFailed(f"scrape of {self.base_url}/metrics failed: {_describe_http(exc)}",
                                 base_url=self.base_url) from None
        return self._parse_metrics(r)

    def _parse_metrics(self, r: httpx.Response) -> VllmLoad:
        if r.status_code != 200:
            raise EndpointFailed(f"{self.base_url}/metrics answered HTTP {r.status_code}", base_url=self.base_url)
        return parse_load(r.text, self.endpoint.model)

    async def health(self) -> bool:
        """GET /health == 200 (the engine is up)."""
        try:
            r = await self._aclient().get("/health", timeout=self.config.scrape_timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def models(self) -> list[ServedModel]:
        """GET /v1/models (sync: used while building the engine)."""
        try:
            r = self._sync.get("/v1/models")
        except httpx.HTTPError as exc:
            raise EndpointFailed(f"{self.base_url}/v1/models failed: {_describe_http(exc)}",
                                 base_url=self.base_url) from None
        if r.status_code != 200:
            self._raise_sync_status(r, "/v1/models")
        return [ServedModel(m["id"], int(m.get("max_model_len") or 0), str(m.get("root") or m["id"]))
                for m in r.json().get("data", [])]

    # -- token counts (sync, cached) ------------------------------------------------------------
    def _count_text(self, text: str) -> int:
        return len(self._text_ids(text, False))

    def _count_chat(self, messages: tuple[tuple[str, str], ...]) -> int:
        body = {"model": self.endpoint.model, "messages": [{"role": r, "content": c} for r, c in messages],
                "add_generation_prompt": True}
        return int(self._post_sync("/tokenize", body)["count"])

    def _tokenize_sync(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        body = {"model": self.endpoint.model, "prompt": text, "add_special_tokens": add_special_tokens}
        return tuple(self._post_sync("/tokenize", body)["tokens"])

    def tokenize(self, text: str, add_special_tokens: bool = False) -> tuple[int, ...]:
        """Token ids of `text` in the served tokenizer (cached)."""
        return self._text_ids(text, add_special_tokens)

    def tokenize_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True
                      ) -> tuple[int, ...]:
        """Token ids of `messages` after the served chat template (not cached)."""
        body = {"model": self.endpoint.model, "messages": [{"role": r, "content": c} for r, c in messages],
                "add_generation_prompt": add_generation_prompt}
        return tuple(self._post_sync("/tokenize", body)["tokens"])

    def _post_sync(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._sync.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EndpointFailed(f"{self.base_url}{path} failed: {_describe_http(exc)}",
                                 base_url=self.base_url) from None
        if r.status_code != 200:
            self._raise_sync_status(r, path)
        return r.json()

    def _raise_sync_status(self, r: httpx.Response, path: str) -> None:
        if r.status_code in RETRY_STATUSES:
            raise EndpointFailed(f"{self.base_url}{path} answered HTTP {r.status_code}: {_error_message(r)}",
                                 base_url=self.base_url)
        self._raise_status(r)


def _logprobs(block: Any) -> list[float]:
    """Sampled-token log-probs of one stream chunk: chat (`content[].logprob`) or completions
    (`token_logprobs`)."""
    if not block:
        return []
    if isinstance(block.get("content"), list):
        return [float(t["logprob"]) for t in block["content"] if t.get("logprob") is not None]
    return [float(x) for x in block.get("token_logprobs") or () if x is not None]


def _describe_http(exc: Exception) -> str:
    """"ConnectError: [Errno 111] Connection refused"; httpx leaves some messages empty."""
    return f"{type(exc).__name__}: {str(exc) or 'connection lost'}"


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(payload, dict):
        return _describe(payload.get("error", payload.get("detail", payload)))
    return str(payload)[:300]


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]
