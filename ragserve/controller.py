"""The controller: the one module that knows retrieval, planning, scheduling and engines.

query(question) -> retrieve -> decide the plan (given, or METIS: profile -> prune ->
best-fit under the engine's free KV) -> run the plan's synthesis program on the engine
(each yielded batch is one engine submission, so fan-outs batch) -> QueryResult.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ragserve.config import Config
from ragserve.domain import LLMResult, QueryResult, RagPlan, RetrievedChunk, Timings
from ragserve.engines.base import Engine
from ragserve.errors import BadInput
from ragserve.retrieval.ingest import Retriever
from ragserve.synthesis import Program, build_program

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4000


@dataclass(frozen=True)
class Decision:
    """The plan a query runs with and why; `details` is reported as-is (profile, pruned, ...)."""

    plan: RagPlan
    queue_s: float = 0.0            # time waiting for the scheduler to admit the query
    profile_s: float = 0.0
    details: dict[str, Any] | None = None
    job_id: str = ""                # the planner's handle, released by `done`


class Planner(Protocol):
    """Chooses a plan for a query whose plan the user did not fix (METIS, issue 3)."""

    max_chunks_needed: int

    async def decide(self, question: str, collection: Any, hits: list[RetrievedChunk],
                     slo_s: float | None = None) -> Decision:
        """Choose the plan for `question` over the ranked `hits`; waits while KV is short."""
        ...

    def done(self, decision: Decision) -> None:
        """The query finished (or failed): release what `decide` reserved."""
        ...


@dataclass(frozen=True)
class ProgramRun:
    answer: str
    results: tuple[LLMResult, ...]
    ttft_s: float          # program start -> first token of the final (answering) call
    queue_s: float         # summed engine admission wait of the first batch


async def run_program(engine: Engine, program: Program) -> ProgramRun:
    """Drive a synthesis program: each yielded batch is one engine submission."""
    t0 = time.perf_counter()
    results: list[LLMResult] = []
    queue_s = 0.0
    batch_start, batch = t0, None
    try:
        calls = next(program)
        while True:
            batch_start = time.perf_counter()
            batch = await engine.generate(calls)
            if not results:
                queue_s = max(r.queue_s for r in batch)
            results.extend(batch)
            calls = program.send(batch)
    except StopIteration as stop:
        answer = stop.value
    assert batch is not None
    ttft_s = (batch_start - t0) + min(r.ttft_s for r in batch)
    return ProgramRun(answer=answer.strip(), results=tuple(results), ttft_s=ttft_s, queue_s=queue_s)


def validate_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadInput(f"query {question!r} is empty; ask a question with some text")
    if len(question) > MAX_QUERY_CHARS:
        raise BadInput(f"query is {len(question)} characters, above the limit of {MAX_QUERY_CHARS}")
    return question.strip()


class Controller:
    def __init__(self, engine: Engine, retriever: Retriever, config: Config | None = None,
                 planner: Planner | None = None, default_plan: RagPlan | None = None) -> None:
        self.engine = engine
        self.retriever = retriever
        self.config = config or Config()
        self.planner = planner
        self.default_plan = default_plan

    async def query(self, question: str, collection: str, plan: RagPlan | None = None,
                    filters: dict[str, Any] | None = None, slo_s: float | None = None) -> QueryResult:
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
        hits, retrieve_s = self.retriever.retrieve(col, question, k, filters)
        if not hits:
            raise BadInput(f"no chunk of collection {collection!r} matches filters {filters!r}")

        decision = Decision(plan) if plan else await self.planner.decide(question, col, hits, slo_s)
        try:
            used = hits[: decision.plan.num_chunks]
            program = build_program(question, [h.chunk for h in used], decision.plan, self.config.synthesis)
            program_t = time.perf_counter()
            run = await run_program(self.engine, program)
        finally:
            if self.planner and plan is None:
                self.planner.done(decision)
        total_s = time.perf_counter() - t0
        timings = Timings(retrieve_s=retrieve_s, profile_s=decision.profile_s,
                          queue_s=decision.queue_s + run.queue_s, ttft_s=program_t - t0 + run.ttft_s,
                          total_s=total_s)
        logger.info("query plan=%s chunks=%d calls=%d ttft=%.2fs total=%.2fs", decision.plan, len(used),
                    len(run.results), timings.ttft_s, total_s)
        return QueryResult(question=question, answer=run.answer, plan=decision.plan, chunks=tuple(used),
                           timings=timings, prompt_tokens=sum(r.prompt_tokens for r in run.results),
                           output_tokens=sum(r.output_tokens for r in run.results),
                           num_calls=len(run.results), decision=decision.details or {})
