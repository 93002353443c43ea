"""The tuned controller on the real engine: its plans shrink as the measured queue grows and
grow back when it drains.

The quality model is a real fitted regressor that says more chunks are a little better
(this test is about load, not about what SmolLM2 answers); the speeds are the engine's
own measurements, the backlog its own queue.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ragserve.config import Config, EngineConfig, MetisConfig, SynthesisConfig, TunedConfig
from ragserve.controller import Controller
from ragserve.domain import LLMCall, Method, RagPlan
from ragserve.quality import QualityModel, feature_rows
from ragserve.retrieval.ingest import Retriever
from tests.conftest import shared_embedder

pytestmark = pytest.mark.model

GRID = (RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 3))
QUESTION = "When did the 1973 oil crisis begin?"


def more_chunks_model() -> QualityModel:
    """Fitted on rows where stuff:3 scores 0.1 above stuff:1 whatever the query."""
    from sklearn.linear_model import LinearRegression

    retrieval = {"scores": [0.6, 0.5, 0.4], "doc_ids": ["a", "b", "c"], "tokens": [200, 200, 200]}
    x = feature_rows(QUESTION, retrieval, GRID)
    est = LinearRegression().fit(np.vstack([x, x]), [0.4, 0.5, 0.4, 0.5])
    return QualityModel(est, {"grid": [str(p) for p in GRID]})


def test_plans_shrink_as_the_queue_grows_and_grow_back_when_it_drains(small_squad):
    from ragserve.engines.local.engine import LocalEngine
    from ragserve.tuned import TunedPlanner

    engine = LocalEngine(EngineConfig(model="smollm2", max_batch_size=4))
    # 0.1 quality for ~1-2 s more of prefill is worth it idle (0.02/s) and not behind a queue.
    config = Config(synthesis=SynthesisConfig(answer_tokens=8), metis=MetisConfig(feedback_every=0),
                    tuned=TunedConfig(time_value=0.02, slack=5.0))
    planner = TunedPlanner(engine, config, models={small_squad: more_chunks_model()})
    controller = Controller(engine, Retriever(shared_embedder()), config, planner=planner)
    filler = "The committee reviewed the minutes of the previous meeting in detail. " * 60

    async def run():
        # measure this machine first: a few calls fill the speed tracker
        for _ in range(4):
            await controller.query(QUESTION, small_squad, plan=RagPlan(Method.STUFF, 2))
        idle = await controller.query(QUESTION, small_squad)
        background = [asyncio.ensure_future(engine.generate([LLMCall((("user", filler),), 2)]))
                      for _ in range(12)]
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

    speeds = idle.decision["speeds"]
    print({k: (r.plan, r.decision.get('reason'), r.decision.get('backlog_s')) for k, r in (('idle', idle), ('busy', busy), ('drained', drained))}, queued, speeds)
    assert speeds["num_prefills"] >= 4 and speeds["prefill_tok_s"] > 0
    assert idle.decision["planner"] == "tuned"
    assert idle.plan == RagPlan(Method.STUFF, 3) and idle.decision["reason"] == "quality"
    assert queued > 0
    assert busy.decision["backlog_s"] > 0
    assert busy.plan == RagPlan(Method.STUFF, 1) and busy.decision["reason"] == "load"
    assert drained.plan == RagPlan(Method.STUFF, 3) and drained.decision["reason"] == "quality"
    assert set(idle.decision["predicted_quality"]) == {"stuff:1", "stuff:3"}
