"""The controller: wires retrieval, the planner and the engine for one query.

query(question) -> retrieve -> decide the plan (given, or METIS: profile -> prune ->
best-fit under the engine's free KV) -> run the plan's synthesis program on the engine
(each yielded batch is one engine submission, so fan-outs batch) -> QueryResult.

`query_stream` runs the same steps as events for the HTTP server: `Planned` once the plan
is chosen, then the answer's text pieces as the final (answering) call decodes them, then
the `QueryResult`. Cancelling the consumer cancels the engine calls and releases the plan's
reservation.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Protocol, Union

from ragserve.config import Config
from ragserve.domain import LLMResult, PlanDecision, QueryResult, RagPlan, RetrievedChunk, Timings
from ragserve.engines.base import Engine
from ragserve.errors import BadInput
from ragserve.retrieval.ingest import Retriever
from ragserve.synthesis import Program, answer_batch, build_program, clean_answer

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4000


@dataclass(frozen=True)
class Decision:
    """A planner's answer to `decide`: what it chose and why (reported with the answer), how
    long choosing took, and its handle for `done`."""

    chosen: PlanDecision
    queue_s: float = 0.0            # time waiting for the scheduler to admit the query
    profile_s: float = 0.0
    job_id: str = ""                # the planner's handle, released by `done`

    @property
    def plan(self) -> RagPlan:
        return self.chosen.plan


@dataclass(frozen=True)
class PlannerStats:
    """What a planner reports about itself (server /stats and /metrics, eval, the explorer)."""

    num_waiting: int = 0                 # queries waiting for free KV
    held_tokens: int = 0                 # KV reserved for admitted queries still running
    kv_free_tokens: int | None = None    # free KV as the planner plans with it; None = the engine's
    plans: dict[str, int] = field(default_factory=dict)     # plans chosen, by method
    reasons: dict[str, int] = field(default_factory=dict)   # plans chosen, by reason


class QueryPlanner(Protocol):
    """Chooses a plan for a query whose plan the user did not fix (METIS: ragserve.metis.planner)."""

    max_chunks_needed: int

    async def decide(self, question: str, collection: Any, hits: list[RetrievedChunk],
                     slo_s: float | None = None) -> Decision:
        """Choose the plan for `question` over the ranked `hits`; waits while KV is short."""
        ...

    def done(self, decision: Decision) -> None:
        """The query finished (or failed): release what `decide` reserved."""
        ...

    def stats(self) -> PlannerStats:
        """A current snapshot; cheap."""
        ...


@dataclass(frozen=True)
class ProgramRun:
    answer: str
    results: tuple[LLMResult, ...]
    ttft_s: float          # program start -> first token of the final (answering) call
    queue_s: float         # summed engine admission wait of the first batch
    finish_reason: str = "stop"   # "length" when the call that wrote the answer hit its token cap


@dataclass(frozen=True)
class Planned:
    """First event of `Controller.query_stream`: the plan the query runs with."""

    plan: RagPlan
    chunks: tuple[RetrievedChunk, ...]   # the chunks the plan reads, best first
    decision: PlanDecision               # what was decided and why (just the plan when given)

    def to_dict(self) -> dict[str, Any]:
        return {**self.decision.to_dict(), "chunks": [c.to_dict() for c in self.chunks]}


StreamEvent = Union[Planned, str, QueryResult]


async def drive_program(engine: Engine, program: Program, stream_batch: int | None = None,
                        collection: str = "") -> AsyncIterator[str | ProgramRun]:
    """Drive a synthesis program: each yielded batch is one engine submission.

    Yields the text pieces of batch number `stream_batch` as they decode (when that batch is
    a single call and the engine can stream), then the `ProgramRun`. `collection` is stamped
    on every call (engines may apply per-collection settings).
    """
    t0 = time.perf_counter()
    results: list[LLMResult] = []
    queue_s = 0.0
    batch_start, batch = t0, None
    try:
        calls = next(program)
        index = 0
        while True:
            if collection:
                calls = [replace(c, collection=collection) for c in calls]
            batch_start = time.perf_counter()
            if index == stream_batch and len(calls) == 1:
                pieces, future = await engine.stream_result(calls[0])
                try:
                    async with aclosing(pieces):
                        async for piece in pieces:
                            yield piece
                    batch = [await future]
                finally:
                    future.cancel()   # no-op when done; stops decoding when the consumer left
            else:
                batch = await engine.generate(calls)
            if not results:
                queue_s = max(r.queue_s for r in batch)
            results.extend(batch)
            calls = program.send(batch)
            index += 1
    except StopIteration as stop:
        answer = stop.value
    assert batch is not None
    ttft_s = (batch_start - t0) + min(r.ttft_s for r in batch)
    # The answer comes from the last batch (map_rerank: the candidate it picked).
    finish = next((r.finish_reason for r in batch if clean_answer(r.text) == answer.strip()), "stop")
    yield ProgramRun(answer=answer.strip(), results=tuple(results), ttft_s=ttft_s, queue_s=queue_s,
                     finish_reason=finish)


async def run_program(engine: Engine, program: Program) -> ProgramRun:
    """Drive a synthesis program to its answer (see `drive_program`)."""
    async with aclosing(drive_program(engine, program)) as steps:
        async for step in steps:
            run = step
    assert isinstance(run, ProgramRun)
    return run


def validate_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadInput(f"query {question!r} is empty; ask a question with some text")
    if len(question) > MAX_QUERY_CHARS:
        raise BadInput(f"query is {len(question)} characters, above the limit of {MAX_QUERY_CHARS}")
    return question.strip()


class Controller:
    def __init__(self, engine: Engine, retriever: Retriever, config: Config | None = None,
                 planner: QueryPlanner | None = None, default_plan: RagPlan | None = None) -> None:
        self.engine = engine
        self.retriever = retriever
        self.config = config or Config()
        self.planner = planner
        self.default_plan = default_plan

    async def query(self, question: str, collection: str, plan: RagPlan | None = None,
                    filters: dict[str, Any] | None = None, slo_s: float | None = None,
                    steer: bool | None = None, max_answer_tokens: int | None = None) -> QueryResult:
        """`steer` (LLMSteer in the embedded engine): None = config.steer for `collection`.
        `max_answer_tokens` caps the answer below synthesis.answer_tokens (never above: plans
        are priced and admitted with that length)."""
        async with aclosing(self._run(question, collection, plan, filters, slo_s, stream=False,
                                      steer=steer, max_answer_tokens=max_answer_tokens)) as events:
            async for event in events:
                result = event
        assert isinstance(result, QueryResult)
        return result

    def query_stream(self, question: str, collection: str, plan: RagPlan | None = None,
                     filters: dict[str, Any] | None = None, slo_s: float | None = None,
                     steer: bool | None = None, max_answer_tokens: int | None = None
                     ) -> AsyncIterator[StreamEvent]:
        """`query` as events: `Planned`, then the answer's text pieces (streamed from the final
        call; in one piece for map_rerank), then the `QueryResult`. Close it (aclosing) when
        leaving early: that cancels its engine calls and releases the plan's reservation."""
        return self._run(question, collection, plan, filters, slo_s, stream=True, steer=steer,
                         max_answer_tokens=max_answer_tokens)

    async def _run(self, question: str, collection: str, plan: RagPlan | None,
                   filters: dict[str, Any] | None, slo_s: float | None, stream: bool,
                   steer: bool | None = None, max_answer_tokens: int | None = None
                   ) -> AsyncIterator[StreamEvent]:
        t0 = time.perf_counter()
        question = validate_question(question)
        col = self.retriever.collection(collection)
        plan = plan or (None if self.planner else self.default_plan)
        if plan is None and self.planner is None:
            raise BadInput("no plan given and no planner configured; pass --plan METHOD:NUM_CHUNKS")
        if plan is not None and plan.num_chunks > len(col):
            raise BadInput(f"num_chunks {plan.num_chunks} is above the size of collection "
                           f"{collection!r} ({len(col)} chunks)")
        k = plan.num_chunks if plan else min(self.planner.max_chunks_needed, len(col))
        # Off the event loop: embedding the query and the index search take tens of ms.
        hits, retrieve_s = await asyncio.to_thread(self.retriever.retrieve, col, question, k, filters)
        if not hits:
            raise BadInput(f"no chunk of collection {collection!r} matches filters {filters!r}")

        decision = Decision(PlanDecision(plan)) if plan else await self.planner.decide(question, col, hits, slo_s)
        blend_policy = getattr(self.engine, "blend_policy", None)   # the embedded engine's CacheBlend gate
        if blend_policy is not None and (policy := blend_policy(collection)) is not None:
            decision = replace(decision, chosen=replace(decision.chosen, blend=policy.to_dict()))
        streamed: list[str] = []
        try:
            used = hits[: decision.plan.num_chunks]
            if stream:
                yield Planned(decision.plan, tuple(used), decision.chosen)
            if steer is None:
                steer = self.config.steer.steers(collection)
            synthesis = self.config.synthesis
            if max_answer_tokens is not None and max_answer_tokens < synthesis.answer_tokens:
                synthesis = replace(synthesis, answer_tokens=max_answer_tokens)
            program = build_program(question, [h.chunk for h in used], decision.plan, synthesis, steer)
            program_t = time.perf_counter()
            final = answer_batch(decision.plan, len(used)) if stream else None
            async with aclosing(drive_program(self.engine, program, final, collection)) as steps:
                async for step in steps:
                    if isinstance(step, str):
                        streamed.append(step)
                        yield step
                    else:
                        run = step
        finally:
            if self.planner and plan is None:
                self.planner.done(decision)
        sent = "".join(streamed).strip()
        if stream and run.answer.startswith(sent) and len(run.answer) > len(sent):
            yield run.answer[len(sent):]   # the whole answer (map_rerank), or what a stop string cut
        total_s = time.perf_counter() - t0
        timings = Timings(retrieve_s=retrieve_s, profile_s=decision.profile_s,
                          queue_s=decision.queue_s + run.queue_s, ttft_s=program_t - t0 + run.ttft_s,
                          total_s=total_s)
        logger.info("query plan=%s chunks=%d calls=%d ttft=%.2fs total=%.2fs", decision.plan, len(used),
                    len(run.results), timings.ttft_s, total_s)
        yield QueryResult(question=question, answer=run.answer, plan=decision.plan, chunks=tuple(used),
                          timings=timings, prompt_tokens=sum(r.prompt_tokens for r in run.results),
                          output_tokens=sum(r.output_tokens for r in run.results),
                          num_calls=len(run.results), decision=decision.chosen,
                          finish_reason=run.finish_reason)
