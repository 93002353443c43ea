"""The tuned controller on the real engine: its plans shrink as the measured queue grows and
grow back when it drains.

The quality model is a real fitted regressor that says more chunks are a little better
(this test is about load, not about what SmolLM2 answers); the speeds are the engine's
own measurements, the backlog its own queue.
"""
from __future__ import annotations

import asyncio

import pytest

from ragserve.config import Config, EngineConfig, MetisConfig, SynthesisConfig, TunedConfig
from ragserve.controller import Controller
from ragserve.domain import LLMCall, Method, RagPlan
from ragserve.metis.quality import QualityModel
from ragserve.retrieval.ingest import Retriever
from tests.conftest import shared_embedder

pytestmark = pytest.mark.model

GRID = (RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 3))
QUESTION = "When did the 1973 oil crisis begin?"


def more_chunks_model() -> QualityModel:
    """Plan means only (no per-query adjustment): stuff:3 scores 0.1 above stuff:1."""
    return QualityModel(None, {"grid": [str(p) for p in GRID], "plan_means": {"stuff:1": 0.4, "stuff:3": 0.5}})


def test_plans_shrink_as_the_queue_grows_and_grow_back_when_it_drains(small_squad):
    from ragserve.engines.local.engine import LocalEngine
    from ragserve.metis.tuned import TunedPlanner

    engine = LocalEngine(EngineConfig(model="smollm2", max_batch_size=4))
    config = Config(synthesis=SynthesisConfig(answer_tokens=8), metis=MetisConfig(feedback_every=0))
    planner = TunedPlanner(engine, config, models={small_squad: more_chunks_model()})
    controller = Controller(engine, Retriever(shared_embedder()), config, planner=planner)
    filler = "The committee reviewed the minutes of the previous meeting in detail. " * 30

    async def run():
        # measure this machine first: a few calls fill the speed tracker
        for _ in range(4):
            await controller.query(QUESTION, small_squad, plan=RagPlan(Method.STUFF, 2))
        # Price a second so that stuff:3's +0.1 is worth its extra seconds on this machine
        # idle (at half its value), and not behind a queue of several cheap queries.
        col = controller.retriever.collection(small_squad)
        hits, _ = controller.retriever.retrieve(col, QUESTION, 3)
        cost = planner.cost.timed(engine.stats().speeds)
        counts, q = await planner._token_counts(col, hits, QUESTION)
        extra_s = cost.estimate(GRID[1], counts, q).est_latency_s - cost.estimate(GRID[0], counts, q).est_latency_s
        planner.scheduler.rule = TunedConfig(time_value=0.05 / extra_s, slack=10.0)
        idle = await controller.query(QUESTION, small_squad)
        background = [asyncio.ensure_future(engine.generate([LLMCall((("user", filler),), 2)]))
                      for _ in range(6)]
        await asyncio.sleep(0.05)   # the engine takes the first batch; the rest queue
        queued = engine.stats().queued_prefill_tokens
        busy = await controller.query(QUESTION, small_squad)
        await asyncio.gather(*background)
        drained = await controller.query(QUESTION, small_squad)
        return idle, queued, busy, drained

    try:
        idle, queued, busy, drained = asyncio.run(run())
    finally:
        asyncio.run(planner.close())
        asyncio.run(engine.close())

    speeds = idle.decision.speeds.to_dict()
    assert speeds["num_prefills"] >= 4 and speeds["prefill_tok_s"] > 0
    assert idle.decision.planner == "tuned"
    assert idle.plan == RagPlan(Method.STUFF, 3) and idle.decision.reason == "quality"
    assert queued > 0
    assert busy.decision.backlog_s > 0
    assert busy.plan == RagPlan(Method.STUFF, 1) and busy.decision.reason == "load"
    assert drained.plan == RagPlan(Method.STUFF, 3) and drained.decision.reason == "quality"
    assert idle.decision.predicted_quality == {"stuff:1": 0.4, "stuff:3": 0.5}
