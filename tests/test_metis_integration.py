"""METIS on the real engine: 8 concurrent queries against a KV budget that fits only some.

Plans must shrink as load rises, queries that fit nothing wait, and all of them answer."""
from __future__ import annotations

import asyncio

import pytest

from ragserve.config import Config, EngineConfig, MetisConfig, SynthesisConfig
from ragserve.controller import Controller
from ragserve.domain import Method, RagPlan
from ragserve.metis.planner import MetisPlanner, chunk_prompt_tokens
from ragserve.metis.profile import Complexity, ProfileSource, QueryProfile
from ragserve.retrieval.ingest import Retriever
from tests.conftest import shared_embedder

pytestmark = pytest.mark.model

QUESTIONS = [
    "When did oil start getting priced in the terms of gold?",
    "When was the drainage basin of the Amazon believed to have split?",
    "What organization runs the satellite that measured dust on the Amazon?",
    "Why did Saudi Arabia try to increase production?",
    "Which car shows the DOT's revision of categories?",
    "Where did water on the eastern side of the amazon basin travel after the split?",
    "When did the 1973 oil crisis begin?",
    "What civilization was flourishing in the Amazon in the 1540s?",
]


class FixedProfiler:
    """A deterministic profile (joint, low -> stuff over 3..9 chunks): this test is about
    scheduling under load, not about what a 135M model writes as a profile."""

    def profile(self, query: str) -> QueryProfile:
        return QueryProfile(Complexity.LOW, True, 3, (30, 60), confidence=1.0, source=ProfileSource.LEARNED)


def test_plans_shrink_under_load_and_nothing_is_dropped(small_squad, smollm2_engine):
    from ragserve.engines.local.engine import LocalEngine

    # ~4,500 KV tokens: two 9-chunk stuff prompts (~2k tokens each) fit at once, not eight.
    budget_mb = 4500 * smollm2_engine.model.kv_bytes_per_token / 2**20
    engine = LocalEngine(EngineConfig(model="smollm2", kv_budget_mb=budget_mb, max_batch_size=8))
    config = Config(synthesis=SynthesisConfig(answer_tokens=8), metis=MetisConfig(feedback_every=0))
    planner = MetisPlanner(engine, config, learned=FixedProfiler())
    controller = Controller(engine, Retriever(shared_embedder()), config, planner=planner)
    # Queries left waiting after a scheduling step: that some waited is a count, not a time
    # (a time threshold would say more about the machine's speed than about the scheduler).
    left_waiting = []
    schedule = planner.scheduler.schedule

    def counting_schedule(stats, now_s=None):
        decisions = schedule(stats, now_s)
        left_waiting.append(planner.stats().num_waiting)
        return decisions

    planner.scheduler.schedule = counting_schedule

    async def run():
        return await asyncio.gather(*(controller.query(q, small_squad) for q in QUESTIONS))

    def next_plan_cost(question: str, n: int) -> int:
        """KV budget of stuff over n+1 chunks of this query's own ranking (best fit's next step)."""
        col = controller.retriever.collection(small_squad)
        hits, _ = controller.retriever.retrieve(col, question, n + 1)
        counts = chunk_prompt_tokens(engine, col, hits, planner.cost.config.overhead_tokens_per_chunk)
        return planner.cost.estimate(RagPlan(Method.STUFF, n + 1), counts,
                                     engine.count_tokens(question)).kv_budget_tokens

    try:
        results = asyncio.run(run())
        # Queries arrive concurrently and their chunks differ in size, so best fit is checked per
        # query: the chosen plan fit, and one more chunk would not have (or 9 is the largest).
        too_big = {i: next_plan_cost(q, r.plan.num_chunks) for i, (q, r) in enumerate(zip(QUESTIONS, results))
                   if r.decision.reason == "fit" and r.plan.num_chunks < 9}
    finally:
        asyncio.run(planner.close())
        asyncio.run(engine.close())

    assert len(results) == len(QUESTIONS) and all(r.answer.strip() for r in results)
    decisions = sorted(results, key=lambda r: r.decision.kv_free_tokens, reverse=True)
    sizes = [r.plan.num_chunks for r in decisions]
    # The first query sees an idle engine and takes the most expensive plan.
    assert decisions[0].plan.num_chunks == 9 and decisions[0].decision.reason == "fit"
    # Under load, plans shrink: later decisions saw less free KV and got fewer chunks.
    assert min(sizes) < 9
    for i, cost in too_big.items():
        assert cost > results[i].decision.kv_free_tokens, (i, results[i].plan, results[i].decision)
    # Some queries could not run at once and waited for KV instead of being dropped.
    assert max(left_waiting) >= 1
    assert max(r.timings.queue_s for r in results) > min(r.timings.queue_s for r in results)
    # Every decision fit the free KV it saw.
    for r in results:
        assert r.decision.cost.kv_budget_tokens <= r.decision.kv_free_tokens
    assert sum(planner.stats().plans.values()) == len(QUESTIONS)


def test_golden_plan_feedback_runs_end_to_end_with_default_feedback_settings(small_squad, smollm2_engine, caplog):
    """METIS' golden plan (map_reduce x 30 chunks x 300 tokens) prices above the context; the
    loop runs the most expensive version that fits, then the LLM profiler reviews its answer."""
    import logging

    config = Config(engine=EngineConfig(max_context_tokens=2048), synthesis=SynthesisConfig(answer_tokens=8),
                    metis=MetisConfig(feedback_every=1))
    planner = MetisPlanner(smollm2_engine, config)   # the LLM profiler, on the serving engine
    controller = Controller(smollm2_engine, Retriever(shared_embedder()), config, planner=planner)

    async def run():
        try:
            result = await controller.query(QUESTIONS[0], small_squad)
            while planner._background:   # the golden run, in the background
                await asyncio.gather(*planner._background)
            return result
        finally:
            await planner.close()

    with caplog.at_level(logging.INFO, logger="ragserve.metis.planner"):
        result = asyncio.run(run())
    assert result.answer.strip()
    ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feedback: golden run of")]
    assert len(ran) == 1 and "(fit)" in ran[0], [r.getMessage() for r in caplog.records]
    plan = ran[0].split()[4]   # "feedback: golden run of map_reduce:N:300 (fit) ..."
    method, chunks, inter = plan.split(":")
    assert method == "map_reduce" and inter == "300" and 1 < int(chunks) < 30
    assert any(r.getMessage().startswith(f"feedback: golden plan {plan} -> example") for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
