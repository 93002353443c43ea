"""The embedded engine: an in-process LLM server on transformers.

Threads: callers live on an asyncio loop; one worker thread owns the model. A call
becomes a `_Request` with a KV reservation (prompt + max_tokens). The worker loop is
admit -> prefill new rows -> one decode step for the running batch -> finish rows,
like nano-vllm's schedule/execute/postprocess. Admission is FCFS against the KV
budget: a request that does not fit waits (the head blocks, so nothing starves);
none is dropped. Results go back to the caller's loop with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from ragserve.config import EngineConfig, num_threads
from ragserve.domain import EngineStats, LLMCall, LLMResult, ModelSpec
from ragserve.errors import BadInput, EngineDead
from ragserve.engines.local.models import model_dir
from ragserve.engines.local.runner import BatchKV, ModelRunner

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    call: LLMCall
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tokens: asyncio.Queue | None = None       # set for streaming calls
    submit_t: float = field(default_factory=time.perf_counter)
    admit_t: float = 0.0
    first_t: float = 0.0
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: str = ""

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.call.max_tokens


class LocalEngine:
    """Implements `ragserve.engines.base.Engine` in-process."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model_dir(self.config.model), self.config.model, num_threads())
        self.model: ModelSpec = self.runner.spec
        self.tokenizer = self.runner.tokenizer
        self.kv_capacity_tokens = int(self.config.kv_budget_mb * 2**20 // self.model.kv_bytes_per_token)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._kv: BatchKV | None = None
        self._kv_used = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="ragserve-engine", daemon=True)
        self._thread.start()

    # -- Engine protocol ------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return self.runner.count_tokens(text)

    def prompt_tokens(self, call: LLMCall) -> int:
        return len(self.runner.encode_call(call))

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(kv_capacity_tokens=self.kv_capacity_tokens, kv_used_tokens=self._kv_used,
                               num_running=len(self._running), num_waiting=len(self._waiting),
                               kv_bytes_per_token=self.model.kv_bytes_per_token)

    async def generate(self, calls: Sequence[LLMCall]) -> list[LLMResult]:
        requests = [self._make_request(c) for c in calls]
        self._submit(requests)
        return list(await asyncio.gather(*(r.future for r in requests)))

    async def stream(self, call: LLMCall) -> AsyncIterator[str]:
        pieces, result = await self.stream_result(call)
        async for piece in pieces:
            yield piece
        await result   # re-raises an engine failure

    async def stream_result(self, call: LLMCall) -> tuple[AsyncIterator[str], asyncio.Future]:
        """Like `stream`, but also hands back the future of the final `LLMResult`."""
        request = self._make_request(call, streaming=True)
        self._submit([request])

        async def pieces() -> AsyncIterator[str]:
            assert request.tokens is not None
            while (piece := await request.tokens.get()) is not None:
                yield piece
        return pieces(), request.future

    async def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join, 10)

    # -- submission (caller's thread) -----------------------------------------------
    def _make_request(self, call: LLMCall, streaming: bool = False) -> _Request:
        if call.max_tokens < 1:
            raise BadInput(f"max_tokens must be >= 1, got {call.max_tokens}")
        prompt = self.runner.encode_call(call)
        loop = asyncio.get_running_loop()
        request = _Request(call, prompt, loop, loop.create_future(),
                           asyncio.Queue() if streaming else None)
        limit = min(self.kv_capacity_tokens, self.config.max_context_tokens)
        if request.reserve > limit:
            raise BadInput(f"call needs {len(prompt)} prompt + {call.max_tokens} output tokens = "
                           f"{request.reserve}, above the engine limit of {limit} tokens "
                           f"(kv_budget_mb={self.config.kv_budget_mb}, max_context_tokens="
                           f"{self.config.max_context_tokens}); use fewer chunks or raise the limit")
        return request

    def _submit(self, requests: list[_Request]) -> None:
        with self._cond:
            if self._stopped:
                raise EngineDead("the embedded engine is closed")
            self._waiting.extend(requests)   # contiguous: a fan-out is admitted together when it fits
            self._cond.notify()

    # -- worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopped:
                    self._fail(self._running + list(self._waiting), EngineDead("engine closed"))
                    return
                admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode()
            except Exception as exc:  # keep serving: fail only the calls in flight
                logger.exception("engine step failed")
                with self._cond:
                    failed, self._running, self._kv, self._kv_used = self._running, [], None, 0
                self._fail(failed + [r for r in admitted if r not in failed], EngineDead(f"engine step failed: {exc}"))

    def _admit(self) -> list[_Request]:
        """FCFS under the KV budget and batch size; called with the lock held."""
        admitted: list[_Request] = []
        while self._waiting:
            head = self._waiting[0]
            if head.future.cancelled():
                self._waiting.popleft()
                continue
            if (len(self._running) + len(admitted) >= self.config.max_batch_size
                    or self._kv_used + head.reserve > self.kv_capacity_tokens):
                break
            self._waiting.popleft()
            self._kv_used += head.reserve
            head.admit_t = time.perf_counter()
            admitted.append(head)
        return admitted

    def _prefill(self, admitted: list[_Request]) -> None:
        kv, logits = self.runner.prefill([r.prompt for r in admitted])
        with self._cond:
            self._kv = BatchKV.merge(self._kv, kv)
            self._running.extend(admitted)
        self._emit(admitted, logits)

    def _decode(self) -> None:
        assert self._kv is not None
        self._kv, logits = self.runner.decode_step(self._kv, [r.output[-1] for r in self._running])
        self._emit(self._running, logits)

    def _emit(self, rows: list[_Request], logits) -> None:
        """Sample one token for each of `rows` (the last len(rows) rows of the batch)."""
        tokens, logps = self.runner.sample(logits, [r.call.temperature for r in rows])
        now = time.perf_counter()
        for r, tok, lp in zip(rows, tokens.tolist(), logps.tolist()):
            if not r.first_t:
                r.first_t = now
            if tok in self.runner.eos_ids:
                r.finish = "stop"
                continue
            r.output.append(tok)
            r.logprobs.append(lp)
            text = self.runner.decode(r.output)
            piece, r.text = text[len(r.text):], text
            for s in r.call.stop:
                if s and s in r.text:
                    r.text, r.finish, piece = r.text[: r.text.index(s)], "stop", ""
                    break
            if piece and r.tokens is not None:
                r.loop.call_soon_threadsafe(r.tokens.put_nowait, piece)
            if not r.finish and (len(r.output) >= r.call.max_tokens or r.future.cancelled()):
                r.finish = "length"
        self._retire()

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r.finish]
        done = [r for r in self._running if r.finish]
        if not done:
            return
        with self._cond:
            self._kv = self._kv.select(keep) if self._kv is not None else None
            self._running = [self._running[i] for i in keep]
            self._kv_used -= sum(r.reserve for r in done)
        end = time.perf_counter()
        for r in done:
            result = LLMResult(text=r.text.strip(), prompt_tokens=len(r.prompt), output_tokens=len(r.output),
                               ttft_s=r.first_t - r.submit_t, total_s=end - r.submit_t,
                               queue_s=r.admit_t - r.submit_t,
                               token_logprobs=tuple(r.logprobs) if r.call.logprobs else (),
                               finish_reason=r.finish)
            r.loop.call_soon_threadsafe(_resolve, r, result)

    def _fail(self, requests: list[_Request], exc: Exception) -> None:
        for r in requests:
            r.loop.call_soon_threadsafe(_reject, r, exc)


def _resolve(r: _Request, result: LLMResult) -> None:
    if r.tokens is not None:
        r.tokens.put_nowait(None)
    if not r.future.done():
        r.future.set_result(result)


def _reject(r: _Request, exc: Exception) -> None:
    if r.tokens is not None:
        r.tokens.put_nowait(None)
    if not r.future.done():
        r.future.set_exception(exc)
