"""Controller.query_stream with fakes (no model): event order, which call streams, and
cleanup when the consumer leaves early."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from ragserve.config import Config
from ragserve.controller import Controller, Decision, Planned, PlannerStats
from ragserve.synthesis import answer_batch, batch_shape
from ragserve.domain import Chunk, LLMCall, LLMResult, Method, PlanDecision, QueryResult, RagPlan, RetrievedChunk
from ragserve.synthesis import build_program

PLANS = [RagPlan(Method.STUFF, 3), RagPlan(Method.MAP_RERANK, 3), RagPlan(Method.MAP_REDUCE, 3, 16),
         RagPlan(Method.REFINE, 3, 16)]


def make_hits(n: int) -> list[RetrievedChunk]:
    return [RetrievedChunk(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=f"passage {i}", num_tokens=3), 1.0 - i / 10)
            for i in range(n)]


def result(text: str) -> LLMResult:
    return LLMResult(text=text, prompt_tokens=10, output_tokens=len(text.split()), ttft_s=0.01, total_s=0.02,
                     token_logprobs=(-0.1,) * max(1, len(text.split())))


class FakeEngine:
    """Answers every call with 'answer from <tag>'; streams word by word, slowly if asked."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.streamed: list[LLMCall] = []
        self.futures: list[asyncio.Future] = []

    async def generate(self, calls):
        return [result(f"answer from {c.tag}") for c in calls]

    async def stream_result(self, call):
        self.streamed.append(call)
        text = f"answer from {call.tag}"
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)

        async def pieces():
            for i, word in enumerate(text.split()):
                await asyncio.sleep(self.delay_s)
                yield word if i == 0 else " " + word
            future.set_result(result(text))
        return pieces(), future


class FakeRetriever:
    def __init__(self, n: int) -> None:
        self.hits = make_hits(n)

    def collection(self, name):
        return self.hits

    def retrieve(self, col, question, k, filters=None):
        return self.hits[:k], 0.0


class FakePlanner:
    max_chunks_needed = 3

    def __init__(self, plan: RagPlan) -> None:
        self.plan = plan
        self.done_calls = 0

    async def decide(self, question, collection, hits, slo_s=None):
        return Decision(PlanDecision(self.plan, reason="fit"), job_id="j1")

    def stats(self):
        return PlannerStats()

    def done(self, decision):
        self.done_calls += 1


def drive_batches(plan: RagPlan) -> list[list[LLMCall]]:
    program = build_program("q?", [h.chunk for h in make_hits(plan.num_chunks)], plan, Config().synthesis)
    batches, calls = [], next(program)
    try:
        while True:
            batches.append(calls)
            calls = program.send([result("fact") for _ in calls])
    except StopIteration:
        return batches


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_answer_batch_is_the_programs_last_single_call(plan):
    batches = drive_batches(plan)
    index = answer_batch(plan, plan.num_chunks)
    if plan.method is Method.MAP_RERANK:
        assert index is None and len(batches) == 1 and len(batches[0]) == plan.num_chunks
    else:
        assert index == len(batches) - 1 and len(batches[-1]) == 1
    assert [len(b) for b in batches] == list(batch_shape(plan))   # the cost model prices this shape


async def collect(controller: Controller, plan: RagPlan | None):
    async with aclosing(controller.query_stream("q?", "c", plan)) as events:
        return [e async for e in events]


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_stream_is_plan_then_pieces_then_result(plan):
    engine = FakeEngine()
    controller = Controller(engine, FakeRetriever(5), Config())
    events = asyncio.run(collect(controller, plan))
    assert isinstance(events[0], Planned) and events[0].plan == plan
    assert isinstance(events[-1], QueryResult)
    pieces = events[1:-1]
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces).strip() == events[-1].answer
    if plan.method is Method.MAP_RERANK:
        assert engine.streamed == [] and len(pieces) == 1       # the picked answer, in one piece
    else:
        assert [c.tag for c in engine.streamed] == [{"stuff": "stuff", "map_reduce": "reduce",
                                                    "refine": "refine"}[plan.method.value]]
        assert len(pieces) == 3


def test_query_matches_the_streamed_result():
    controller = Controller(FakeEngine(), FakeRetriever(5), Config())
    plain = asyncio.run(controller.query("q?", "c", RagPlan(Method.MAP_REDUCE, 2, 16)))
    streamed = asyncio.run(collect(controller, RagPlan(Method.MAP_REDUCE, 2, 16)))[-1]
    assert plain.answer == streamed.answer == "answer from reduce"
    assert plain.num_calls == streamed.num_calls == 3


def test_leaving_early_cancels_the_call_and_releases_the_plan():
    engine = FakeEngine(delay_s=0.05)
    planner = FakePlanner(RagPlan(Method.STUFF, 2))
    controller = Controller(engine, FakeRetriever(5), Config(), planner=planner)

    async def first_piece():
        async with aclosing(controller.query_stream("q?", "c")) as events:
            planned = await anext(events)
            piece = await anext(events)
            return planned, piece

    planned, piece = asyncio.run(first_piece())
    assert planned.decision.reason == "fit" and piece == "answer"
    assert engine.futures[0].cancelled()
    assert planner.done_calls == 1


def test_cancelling_the_task_releases_the_plan():
    engine = FakeEngine(delay_s=0.05)
    planner = FakePlanner(RagPlan(Method.STUFF, 2))
    controller = Controller(engine, FakeRetriever(5), Config(), planner=planner)

    async def main():
        task = asyncio.ensure_future(collect(controller, None))
        await asyncio.sleep(0.06)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.futures[0].cancelled() and planner.done_calls == 1
