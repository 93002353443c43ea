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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from ragserve.config import BlendConfig, EngineConfig, SteerConfig, data_dir, dtype_override, num_threads
from ragserve.domain import Chunk, EngineSpeeds, EngineStats, LLMCall, LLMResult, ModelSpec
from ragserve.errors import BadInput, EngineDead
from ragserve.engines.speeds import SpeedTracker
from ragserve.engines.local.blend import (Blender, BlendUnsupported, GatherStats, as_batch, kv_spec,
                                          precompute_chunks)
from ragserve.engines.local.blend_gate import BlendGate, BlendPolicy
from ragserve.engines.local.kv_store import KVStore, model_fingerprint
from ragserve.engines.local.models import model_dir, quantized_dir
from ragserve.engines.local.runner import BatchKV, ModelRunner
from ragserve.engines.local.segments import SegmentedPrompt, segment_call

if TYPE_CHECKING:
    from ragserve.engines.local.steer import Steerer, SteerRow

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
    steps_s: float = 0.0                      # time of the decode steps it rode in
    num_steps: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: str = ""
    segments: SegmentedPrompt | None = None   # the chunk layout, when blended or steered
    blend: bool = False                       # CacheBlend: prefilled from stored chunk KV
    blend_ratio: float | None = None          # the gate's ratio for the call's collection
    wants_steer: bool = False                 # LLMSteer asked for (call.steer or the config)
    steer: "SteerRow | None" = None           # LLMSteer: set at prefill when the call is steered

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.call.max_tokens


class LocalEngine:
    """Implements `ragserve.engines.base.Engine` in-process."""

    def __init__(self, config: EngineConfig | None = None, blend: BlendConfig | None = None,
                 steer: SteerConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model_dir(self.config.model), self.config.model, num_threads(), dtype_override(),
                                  self.config.quantization,
                                  quantized_dir(self.config.model, self.config.quantization))
        self._store: KVStore | None = None   # chunk KV (+ steering scores), made on first use
        # -- LLMSteer: made on the first steered call (any call may ask for it) --
        self.steer_config = steer or SteerConfig()
        self.steer_config.layer_indices(self.runner.model.config.num_hidden_layers)   # fail fast
        self._steerer: "Steerer | None" = None
        # -- CacheBlend -------------------------------------------------------------------
        self.blend_config = blend or BlendConfig()
        self.blend_counters = {"blended_calls": 0, "blended_tokens": 0, "reused_tokens": 0, "recomputed_tokens": 0,
                               "prefill_token_equiv": 0.0, "fallbacks": 0, "refused_calls": 0,
                               "segments_stored": 0, "segments_computed": 0}
        self.blender = self._make_blender() if self.blend_config.enabled else None
        self.blend_gate = BlendGate(self._kv_store(), self.blend_config) if self.blender is not None else None
        # -- end CacheBlend ----------------------------------------------------------------
        self.model: ModelSpec = self.runner.spec
        self.tokenizer = self.runner.tokenizer
        self.kv_capacity_tokens = int(self.config.kv_budget_mb * 2**20 // self.model.kv_bytes_per_token)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._kv: BatchKV | None = None
        self._kv_used = 0
        self._prefilling = 0   # prompt tokens admitted and being prefilled now (in no queue)
        self._cond = threading.Condition()
        self._stopped = False
        # Measured speed (stats().speeds). The prior is a 0.5B-class model on 2 CPU cores; the
        # first few calls replace it with this machine's own figures.
        self.speeds = SpeedTracker(EngineSpeeds(prefill_tok_s=200.0, step_base_s=0.12, step_per_row_s=0.01))
        self._thread = threading.Thread(target=self._loop, name="ragserve-engine", daemon=True)
        self._thread.start()

    # -- Engine protocol ------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return self.runner.count_tokens(text)

    def prompt_tokens(self, call: LLMCall) -> int:
        return len(self.runner.encode_call(call))

    @property
    def alive(self) -> bool:
        """The worker thread runs (/readyz)."""
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        speeds = self.speeds.speeds()
        with self._cond:
            queued = self._prefilling + sum(len(r.prompt) for r in self._waiting)
            steps = max((max(0.0, speeds.expected_output(r.call.tag, r.call.max_tokens) - len(r.output))
                         for r in self._running), default=0.0)
            return EngineStats(kv_capacity_tokens=self.kv_capacity_tokens, kv_used_tokens=self._kv_used,
                               num_running=len(self._running), num_waiting=len(self._waiting),
                               kv_bytes_per_token=self.model.kv_bytes_per_token, speeds=speeds,
                               queued_prefill_tokens=queued, decode_steps_left=round(steps))

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
        if self._store is not None:   # let queued KV writes land
            await asyncio.to_thread(self._store.close)

    # -- submission (caller's thread) -----------------------------------------------
    def _make_request(self, call: LLMCall, streaming: bool = False) -> _Request:
        if call.max_tokens < 1:
            raise BadInput(f"max_tokens must be >= 1, got {call.max_tokens}")
        prompt = self.runner.encode_call(call)
        loop = asyncio.get_running_loop()
        request = _Request(call, prompt, loop, loop.create_future(),
                           asyncio.Queue() if streaming else None)
        request.wants_steer = steer = self._wants_steer(call)
        if self.blender is not None or steer:
            segments = self._segments(call, prompt)
            request.blend = (segments is not None and self.blender is not None
                             and segments.num_chunk_tokens >= self.blend_config.min_tokens)
            if request.blend:
                policy = self.blend_policy(call.collection)
                assert policy is not None
                request.blend, request.blend_ratio = policy.blend, policy.ratio
                if not policy.blend:
                    self.blend_counters["refused_calls"] += 1
            request.segments = segments if request.blend or steer else None
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
                self._prefilling = sum(len(r.prompt) for r in admitted)
            try:
                if admitted:
                    self._prefill(admitted)
                    self._prefilling = 0
                if self._running:
                    self._decode()
            except Exception as exc:  # keep serving: fail only the calls in flight
                logger.exception("engine step failed")
                self._prefilling = 0
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
        for r in admitted:
            if r.segments is not None and r.wants_steer:
                r.steer = self._steer_row(r)
        plain = [r for r in admitted if not r.blend]
        if plain:
            t0 = time.perf_counter()
            kv, logits = self.runner.prefill([r.prompt for r in plain], [r.steer for r in plain])
            self.speeds.record_prefill(sum(len(r.prompt) for r in plain), time.perf_counter() - t0)
            self._join(plain, kv, logits)
        for r in admitted:
            if r.blend:
                self._join([r], *self._prefill_blended(r))

    def _join(self, rows: list[_Request], kv: BatchKV, logits) -> None:
        with self._cond:
            self._kv = BatchKV.merge(self._kv, kv)
            self._running.extend(rows)
        self._emit(rows, logits)

    # -- CacheBlend ---------------------------------------------------------------------
    def _kv_store(self) -> KVStore:
        """The chunk KV store (disk tier under <data dir>/kv), shared by blending and steering."""
        if self._store is None:
            name = self.config.model if self.config.quantization == "none" else \
                f"{self.config.model}-{self.config.quantization}"   # quantized weights compute other KV
            model_id = model_fingerprint(model_dir(self.config.model), name, self.runner.dtype)
            self._store = KVStore(data_dir() / "kv", kv_spec(self.runner.model, model_id),
                                  ram_budget_bytes=int(self.blend_config.ram_budget_mb * 2**20))
        return self._store

    def blend_policy(self, collection: str) -> BlendPolicy | None:
        """How calls over `collection` are blended (the gate's verdict); None: blending is off."""
        return self.blend_gate.policy(collection) if self.blend_gate is not None else None

    def blend_stats(self) -> dict[str, Any]:
        """Counters and the per-collection policies resolved so far (HTTP stats)."""
        return {"enabled": self.blender is not None, **self.blend_counters,
                "policies": self.blend_gate.policies() if self.blend_gate is not None else {}}

    def _make_blender(self) -> Blender | None:
        try:
            return Blender(self.runner.model, self._kv_store())
        except BlendUnsupported as exc:
            logger.warning("blending disabled: %s", exc)
            return None

    def precompute_kv(self, chunks: Sequence[Chunk], steer: bool = False) -> GatherStats:
        """Store every chunk's KV for blending (`ragserve ingest --precompute-kv`) and, with
        `steer`, its LLMSteer scores beside it. Runs on the caller's thread: call it before
        serving, while the worker has nothing to run."""
        if self.blender is None:
            raise BadInput("precomputing chunk KV needs blending: enable blend (blend.enabled: true) "
                           "with a model whose layers it supports")
        with self._cond:
            if self._waiting or self._running:
                raise BadInput("precompute_kv runs before serving; this engine has calls in flight")
        return precompute_chunks(self.blender, self.tokenizer, chunks, self._get_steerer() if steer else None)

    def _segments(self, call: LLMCall, prompt: list[int]) -> SegmentedPrompt | None:
        """The call's chunk layout, or None when it has none (prefilled normally, unsteered)."""
        segments = segment_call(self.tokenizer, call)
        if segments is None:
            return None
        if list(segments.token_ids) != prompt:   # never blend or steer a prompt other than the call's
            logger.warning("segmented prompt differs from the chat template's; prefilling normally")
            return None
        return segments

    # -- LLMSteer -------------------------------------------------------------------------
    @property
    def steer_counters(self) -> dict[str, float]:
        return self._steerer.counters.as_dict() if self._steerer is not None else {}

    def _wants_steer(self, call: LLMCall) -> bool:
        return call.steer if call.steer is not None else self.steer_config.enabled

    def _get_steerer(self) -> "Steerer":
        if self._steerer is None:
            from ragserve.engines.local.steer import Steerer

            self._steerer = Steerer(self.runner.model, self.tokenizer, self._kv_store(), self.steer_config)
        return self._steerer

    def _steer_row(self, r: _Request) -> "SteerRow | None":
        """The call's steering (scoring its chunks once, into the store); None = unsteered."""
        assert r.segments is not None
        try:
            return self._get_steerer().row(r.segments)
        except Exception:   # like a failed blend: serve the call unsteered
            logger.exception("steering failed; answering unsteered")
            if self._steerer is not None:
                self._steerer.counters.failures += 1
            return None
    # -- end LLMSteer ----------------------------------------------------------------------

    def _prefill_blended(self, r: _Request) -> tuple[BatchKV, Any]:
        assert self.blender is not None and r.segments is not None
        config = self.blend_config if r.blend_ratio is None else replace(self.blend_config, ratio=r.blend_ratio)
        try:
            if r.steer is not None:   # blend the context, then prefill the question steered
                from ragserve.engines.local.steer import head_prompt

                head = head_prompt(r.segments)
                result = self.blender.blend(head, config)
                self._count_blend(r, result)
                return self.runner.extend(result.cache, r.prompt, len(head), r.steer)
            result = self.blender.blend(r.segments, config)
        except Exception:   # a bad store entry or model quirk must not fail the call
            logger.exception("blend failed; prefilling normally")
            self.blend_counters["fallbacks"] += 1
            return self.runner.prefill([r.prompt], [r.steer])
        self._count_blend(r, result)
        return as_batch(result)

    def _count_blend(self, r: _Request, result: Any) -> None:
        c = self.blend_counters
        c["blended_calls"] += 1
        c["blended_tokens"] += result.num_tokens
        c["reused_tokens"] += result.num_reused
        c["recomputed_tokens"] += result.num_recomputed
        c["prefill_token_equiv"] += result.compute_fraction * result.num_tokens
        c["segments_stored"] += result.gather.num_ram + result.gather.num_disk
        c["segments_computed"] += result.gather.num_computed   # not precomputed: prefilled in the call
        logger.info("blend %s: %d tokens, %d reused (%d ram, %d disk, %d computed), %d recomputed, "
                    "%.0f%% of a prefill's work", r.call.tag or "call", result.num_tokens, result.num_reused,
                    result.gather.num_ram, result.gather.num_disk, result.gather.num_computed,
                    result.num_recomputed, 100 * result.compute_fraction)
    # -- end CacheBlend ------------------------------------------------------------------

    def _decode(self) -> None:
        assert self._kv is not None
        t0 = time.perf_counter()
        self._kv, logits = self.runner.decode_step(self._kv, [r.output[-1] for r in self._running],
                                                   [r.steer for r in self._running])
        step_s = time.perf_counter() - t0
        self.speeds.record_step(len(self._running), step_s)
        for r in self._running:
            r.steps_s += step_s
            r.num_steps += 1
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
            self.speeds.record_output(r.call.tag, len(r.output))
            # steps after the first token (sampled by the prefill); the rest waited for prefills
            self.speeds.record_decode(end - r.first_t, r.steps_s, r.num_steps)
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
