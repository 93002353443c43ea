"""The tuned controller: per query, the plan with the best predicted quality the engine can
deliver now (the decision rule is `ragserve.metis.decide`).

Who owns what: a collection's quality model (trained on its tuning sweep) predicts every
candidate's quality from the query and its retrieval; the cost model, timed with the
engine's measured speeds at this moment, prices each in KV and seconds; the scheduler
admits under free KV and applies the rule. A collection with no quality model is planned by
METIS' rules (priced in the same measured time), so nothing breaks for new collections.

Where a collection's model comes from, first match wins: `tuned.models[collection]` in the
config, then `<collection dir>/quality/` (what `ragserve tune --collection C` writes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ragserve.config import Config
from ragserve.controller import Decision
from ragserve.domain import Method, PlanDecision, RagPlan, RetrievedChunk
from ragserve.engines.base import Engine
from ragserve.metis.planner import MetisPlanner, collection_blend_fraction
from ragserve.metis.rules import degenerate
from ragserve.metis.quality import QualityModel, load_quality_model
from ragserve.metis.scheduler import Job

logger = logging.getLogger(__name__)

QUALITY_DIR = "quality"   # inside a collection's directory


class TunedPlanner(MetisPlanner):
    """Implements the controller's planner protocol; METIS' own `decide` for collections
    without a quality model."""

    def __init__(self, engine: Engine, config: Config, models: dict[str, QualityModel] | None = None,
                 learned: Any = None, profiler: Any = None) -> None:
        """`models`: quality models by collection name, ahead of the config's and the collection
        directory's; `learned`/`profiler`: METIS' profiler for collections without one."""
        super().__init__(engine, config, learned=learned, profiler=profiler)
        self.scheduler.rule = config.tuned
        self._models: dict[str, QualityModel | None] = dict(models or {})
        self.max_chunks_needed = max([self.max_chunks_needed]
                                     + [p.num_chunks for m in self._models.values() if m for p in m.grid])

    def model_for(self, collection: Any) -> QualityModel | None:
        name = collection.name
        if name not in self._models:
            path = self.config.tuned.models.get(name)
            if path is None:
                local = Path(getattr(collection, "path", "")) / QUALITY_DIR
                path = local if (local / "quality_model.json").is_file() else None
            self._models[name] = load_quality_model(path) if path is not None else None
            if self._models[name] is not None:
                logger.info("tuned: collection %s plans with the quality model in %s", name, path)
        return self._models[name]

    async def decide(self, question: str, collection: Any, hits: list[RetrievedChunk],
                     slo_s: float | None = None) -> Decision:
        model = self.model_for(collection)
        if model is None:
            return await super().decide(question, collection, hits, slo_s)
        t0 = time.perf_counter()
        plans = [p for p in model.grid if p.num_chunks <= len(hits) and not degenerate(p)]
        if not plans:   # fewer hits than any trained plan reads: stuff over what there is
            plans = [RagPlan(Method.STUFF, len(hits))]
        qualities = model.predict(question, hits, plans)
        predict_s = time.perf_counter() - t0
        counts, question_tokens = await self._token_counts(collection, hits, question)
        stats = self.retime()
        job = Job(f"q{next(self._ids)}", tuple(plans), Method.STUFF, tuple(counts), question_tokens,
                  slo_s=slo_s, qualities=tuple(qualities),
                  blend_fraction=collection_blend_fraction(self.engine, collection.name))
        decision = await self._admit(job)
        chosen = PlanDecision(decision.plan, decision.reason.value, pruned=tuple(plans),
                              kv_free_tokens=decision.kv_free_tokens, cost=decision.cost, planner="tuned",
                              admission_s=decision.wait_s,
                              predicted_quality={str(p): q for p, q in zip(plans, qualities)},
                              backlog_s=decision.backlog_s, speeds=stats.speeds)
        # profile_s: the quality prediction stands where METIS' profiler does
        return Decision(chosen, queue_s=decision.wait_s, profile_s=predict_s, job_id=job.id)
