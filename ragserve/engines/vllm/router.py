"""Replica set: load-aware routing over vLLM endpoints, health checks and failover.

Who owns what: each `Replica` holds one endpoint's client and its last load scrape; the
`ReplicaSet` owns the background monitor, picks an endpoint per submission and moves a
failed call to another one. The engine (engine.py) is the only caller.

Data flow:

    monitor (every scrape_interval_s): healthy -> GET /metrics -> VllmLoad (a failure marks
        the replica down); down -> GET /health, then /metrics -> back in when both pass
    route(batch): best healthy replica = most free KV tokens, where free = the scrape's free
        tokens minus the estimated KV (prompt + max_tokens) of our calls the scrape cannot show
        yet: those still before their first token (vLLM counts a request's blocks once it is
        scheduled, and a prefill step can take seconds on CPU), and those whose first token came
        after the scrape began. Ties go to the shorter queue, then to fewer calls in flight. A
        whole batch (a fan-out) goes to one replica so vLLM batches it; the batch is reserved
        on the replica as it is routed, so concurrent batches spread out.
    failure of a call before any piece reached its caller -> the replica is marked down, the
        call re-runs on the next best replica (each replica tried once per call)

`stats()` semantics with several replicas: the snapshot of the replica the next submission
would go to (the best one), with `age_s` = time since that scrape began. The scheduler thus
plans a query against the free KV of the replica its calls will land on. A snapshot older
than `max_staleness_s` is refreshed synchronously before it is returned (bounded by
`scrape_timeout_s`), so staleness is bounded even when the event loop is busy. With no
healthy replica, the last snapshot of any replica is returned (its `age_s` keeps growing)
and submissions fail with EngineUnavailable.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from ragserve.config import VllmConfig
from ragserve.domain import EngineStats, LLMCall, LLMResult
from ragserve.engines.vllm.client import EndpointFailed, VllmClient
from ragserve.engines.vllm.metrics import VllmLoad
from ragserve.errors import EngineUnavailable

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3   # conservative prompt-size estimate for routing only (exact counts cost a request)

# How a call is run on a chosen replica: (replica, call, max_retries, on_first_token) ->
# result. The engine supplies it (it knows about LMCache layouts and streaming callbacks).
Runner = Callable[["Replica", LLMCall, "int | None", Callable[[], None]], Awaitable[LLMResult]]


def estimate_call_tokens(call: LLMCall) -> int:
    """KV a call will hold at most: prompt (estimated from its length) + max_tokens."""
    return sum(len(c) for _, c in call.messages) // CHARS_PER_TOKEN + 8 * len(call.messages) + call.max_tokens


@dataclass
class _Reservation:
    tokens: int                     # estimated KV: prompt + max_tokens
    visible_t: float = math.inf     # time.monotonic() of its first token; a scrape begun later shows it


@dataclass(eq=False)
class Replica:
    client: VllmClient
    load: VllmLoad | None = None
    scraped_t: float = 0.0      # time.monotonic() when the last good scrape began
    healthy: bool = False
    error: str = "not scraped yet"
    down_t: float = 0.0         # when it was last marked down
    num_calls: int = 0          # calls sent to it so far
    active: dict[int, _Reservation] = field(default_factory=dict)   # calls in flight on it

    @property
    def base_url(self) -> str:
        return self.client.base_url

    @property
    def in_flight(self) -> int:
        return len(self.active)

    def pending_tokens(self) -> int:
        """Estimated KV of our calls in flight that the last scrape does not show yet."""
        return sum(r.tokens for r in self.active.values() if r.visible_t >= self.scraped_t)

    def free_tokens(self) -> int:
        """Routing score: free KV in the last scrape minus our calls it does not show."""
        if self.load is None:
            return -1
        return self.load.kv_free_tokens - self.pending_tokens()

    def age_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.scraped_t if self.scraped_t else math.inf

    def stats(self, kv_bytes_per_token: int) -> EngineStats:
        assert self.load is not None
        return self.load.to_stats(kv_bytes_per_token=kv_bytes_per_token, age_s=self.age_s(),
                                  extra_used_tokens=self.pending_tokens())

    def record(self, load: VllmLoad, began_t: float) -> None:
        if not self.healthy:
            logger.info("vLLM %s is up: %d KV tokens, %d%% used", self.base_url, load.kv_capacity_tokens,
                        round(100 * load.kv_usage))
        self.load, self.scraped_t, self.healthy, self.error = load, began_t, True, ""

    def mark_down(self, error: str) -> None:
        if self.healthy:
            logger.warning("vLLM %s taken out: %s", self.base_url, error)
        self.healthy, self.error, self.down_t = False, error, time.monotonic()


class ReplicaSet:
    def __init__(self, clients: Sequence[VllmClient], config: VllmConfig) -> None:
        if not clients:
            raise ValueError("a replica set needs at least one endpoint")
        self.config = config
        self.replicas = [Replica(c) for c in clients]
        self.kv_bytes_per_token = 0
        self._ids = itertools.count()
        self._monitor: asyncio.Task | None = None
        self._closed = False

    # -- load ------------------------------------------------------------------------------
    def refresh_sync(self, replicas: Sequence[Replica] | None = None) -> None:
        """Scrape now, blocking (engine construction, stale snapshots)."""
        for r in replicas if replicas is not None else self.replicas:
            began = time.monotonic()
            try:
                r.record(r.client.scrape_sync(), began)
            except EngineUnavailable as exc:
                r.mark_down(str(exc))

    async def refresh(self, replica: Replica) -> None:
        began = time.monotonic()
        if not replica.healthy and not await replica.client.health():
            replica.error = replica.error or "GET /health failed"
            return
        try:
            replica.record(await replica.client.scrape(), began)
        except EngineUnavailable as exc:
            replica.mark_down(str(exc))

    async def refresh_if_stale(self) -> None:
        """On demand before a decision: re-scrape replicas older than max_staleness_s."""
        stale = [r for r in self.replicas if r.age_s() > self.config.max_staleness_s]
        if stale:
            await asyncio.gather(*(self.refresh(r) for r in stale))

    def ensure_monitor(self) -> None:
        """Start the background scrape/health task on the running loop (idempotent)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._monitor
        if self._closed or (task is not None and not task.done() and task.get_loop() is loop):
            return
        self._monitor = loop.create_task(self._watch(), name="ragserve-vllm-monitor")

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self.refresh(r) for r in self.replicas), return_exceptions=True)
            await asyncio.sleep(self.config.scrape_interval_s)

    async def close(self) -> None:
        self._closed = True
        if self._monitor is not None and not self._monitor.done():
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, RuntimeError):   # RuntimeError: task of another loop
                pass

    # -- choice ----------------------------------------------------------------------------
    def best(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The healthy replica with the most free KV (then the shortest queue), or None."""
        candidates = [r for r in self.replicas if r.healthy and r.load is not None and r not in exclude]
        if not candidates:
            return None
        return max(candidates, key=lambda r: (r.free_tokens(), -r.load.num_waiting, -r.in_flight))

    def stats(self) -> EngineStats:
        """The snapshot of the replica the next submission goes to (see the module docstring)."""
        self.ensure_monitor()
        best = self.best()
        if best is not None and best.age_s() > self.config.max_staleness_s:
            self.refresh_sync([best])
            best = self.best()
        if best is None:
            known = [r for r in self.replicas if r.load is not None]
            if not known:
                raise EngineUnavailable(self.unavailable_message())
            best = max(known, key=lambda r: r.scraped_t)
        return best.stats(self.kv_bytes_per_token)

    def unavailable_message(self) -> str:
        """Why no replica can take a call, per endpoint, and what to do."""
        states = "; ".join(f"{r.base_url}: {r.error or 'down'}" for r in self.replicas)
        return (f"no healthy vLLM endpoint ({states}); start one (scripts/vllm_server.sh start) "
                "or fix vllm.endpoints, then retry")

    # -- running calls -------------------------------------------------------------------------
    def route(self) -> Replica:
        """The replica for the next submission; EngineUnavailable when none is healthy."""
        best = self.best()
        if best is None:
            raise EngineUnavailable(self.unavailable_message())
        return best

    async def run_batch(self, calls: Sequence[LLMCall], runner: Runner) -> list[LLMResult]:
        """Run a batch concurrently on one replica (so vLLM batches it); failed calls move on."""
        await self.refresh_if_stale()
        replica = self.route()
        keys = [self._reserve(replica, c) for c in calls]   # before any await: the next batch sees them
        return list(await asyncio.gather(*(self._run(c, runner, replica, k) for c, k in zip(calls, keys))))

    async def run_call(self, call: LLMCall, runner: Runner) -> LLMResult:
        """Run one call on the best replica (see `_run` for failover)."""
        replica = self.route()
        return await self._run(call, runner, replica, self._reserve(replica, call))

    def _reserve(self, replica: Replica, call: LLMCall) -> int:
        key = next(self._ids)
        replica.active[key] = _Reservation(estimate_call_tokens(call))
        replica.num_calls += 1
        return key

    async def _run(self, call: LLMCall, runner: Runner, replica: Replica, key: int) -> LLMResult:
        """Run `call` on `replica`; on an endpoint failure before any piece reached the caller,
        take that replica out and move the call to the next best one (each tried once)."""
        tried: list[Replica] = []
        try:
            while True:
                tried.append(replica)
                others = self.best(exclude=tried) is not None
                reservation = replica.active[key]

                def visible(r: _Reservation = reservation) -> None:
                    r.visible_t = time.monotonic()
                try:
                    # With another replica to go to, fail over at once instead of retrying here.
                    return await runner(replica, call, 0 if others else None, visible)
                except EndpointFailed as exc:
                    if exc.streamed or not exc.endpoint_down:
                        raise
                    replica.mark_down(str(exc))
                    nxt = self.best(exclude=tried)
                    if nxt is None:
                        raise EngineUnavailable(f"call ({call.tag or 'llm'}) failed on "
                                                f"{', '.join(r.base_url for r in tried)}: {exc}. "
                                                + self.unavailable_message()) from None
                    logger.warning("vLLM call (%s) moves from %s to %s: %s", call.tag or "llm",
                                   replica.base_url, nxt.base_url, exc)
                    replica.active.pop(key, None)
                    replica, key = nxt, self._reserve(nxt, call)
        finally:
            replica.active.pop(key, None)
