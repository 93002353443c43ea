"""The systems an evaluation compares (METIS §7.1 baselines), as controller planners.

    fixed:<plan>  every query runs the same plan (vLLM / Parrot* baseline); `fixed` in a
                  systems list expands to one system per plan of the fixed grid
    adaptive      AdaptiveRAG*: profile -> prune -> the most expensive pruned plan, chosen
                  for quality only: it never looks at the engine's load (`AdaptivePlanner`)
    metis         the controller's METIS planner (profile -> prune -> best fit under free KV)
    metis+blend   metis on an engine that reuses chunk KV (CacheBlend, `blend.enabled`)
    tuned         the tuned controller (ragserve/tuned.py): predicted quality per plan from a
                  quality model (`--quality SWEEP_DIR`, cross-fitted so no query is planned by
                  a model that saw it) against measured service time and load
    tuned+blend   tuned on the blending engine: stuff plans are priced at the prefill blending
                  leaves (blend.ratio of their chunk tokens), so larger stuff plans fit the
                  same latency budget. The quality model was fitted on unblended answers: what
                  blending costs in quality is measured by the run, not predicted

A fixed system has no planner (the plan is passed with each query); the others implement
the controller's `QueryPlanner` protocol. Systems are only descriptions here; the runner builds
their engines and controllers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ragserve.config import Config
from ragserve.controller import Decision, PlannerStats
from ragserve.domain import Method, PlanDecision, RagPlan, RetrievedChunk
from ragserve.errors import BadInput
from ragserve.metis.llm_profiler import SEED_EXAMPLES, ProfilePromptBuilder, run_llm_profiler
from ragserve.metis.planner import (MetisPlanner, PlannerSetup, llm_profiler_engine, profile_builder,
                                    prompt_token_counts)
from ragserve.metis.profile import LearnedProfiler
from ragserve.metis.rules import prune

logger = logging.getLogger(__name__)

KINDS = ("fixed", "adaptive", "metis", "metis+blend", "tuned", "tuned+blend")

# The fixed grid of `fixed`: one plan per method at a small and a larger size, sized for
# CPU engines: map_reduce with long summaries costs minutes per query on a CPU under load,
# so the grid's map_reduce maps 4 chunks to 32-token summaries.
DEFAULT_FIXED_GRID: tuple[RagPlan, ...] = (
    RagPlan(Method.MAP_RERANK, 4), RagPlan(Method.STUFF, 2), RagPlan(Method.STUFF, 6),
    RagPlan(Method.MAP_REDUCE, 4, 32),
)


@dataclass(frozen=True)
class System:
    name: str                   # "fixed:stuff:4" | "adaptive" | "metis" | "metis+blend" | "tuned" | "tuned+blend"
    kind: str                   # one of KINDS
    plan: RagPlan | None = None   # the fixed plan (kind fixed only)

    @property
    def blend(self) -> bool:
        return self.kind.endswith("+blend")

    @property
    def tuned(self) -> bool:
        return self.kind.startswith("tuned")


def parse_grid(text: str | None) -> tuple[RagPlan, ...]:
    """Comma-separated METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS]; None -> DEFAULT_FIXED_GRID."""
    if not text:
        return DEFAULT_FIXED_GRID
    plans = tuple(dict.fromkeys(RagPlan.parse(p.strip()) for p in text.split(",") if p.strip()))
    if not plans:
        raise BadInput(f"plan grid {text!r} is empty; e.g. stuff:2,map_rerank:4,map_reduce:6:64")
    return plans


def parse_systems(text: str, grid: Sequence[RagPlan] = DEFAULT_FIXED_GRID) -> list[System]:
    """`fixed,adaptive,metis[,metis+blend],tuned[,tuned+blend]`; `fixed` expands to the grid, `fixed:<plan>`
    names one plan."""
    out: list[System] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "fixed":
            out += [System(f"fixed:{p}", "fixed", p) for p in grid]
        elif item.startswith("fixed:"):
            plan = RagPlan.parse(item[len("fixed:"):])
            out.append(System(f"fixed:{plan}", "fixed", plan))
        elif item in KINDS:
            out.append(System(item, item))
        else:
            raise BadInput(f"unknown system {item!r}; choose from fixed, fixed:<plan>, adaptive, "
                           "metis, metis+blend, tuned, tuned+blend")
    names = [s.name for s in out]
    if not out or len(set(names)) != len(names):
        raise BadInput(f"systems {text!r} must name at least one system, each once")
    return out


def unavailable_reason(system: System, config: Config) -> str | None:
    """Why `system` cannot run with `config`, or None when it can."""
    if not system.blend:
        return None
    if config.engine.backend == "vllm" and not all(e.lmcache_blend for e in config.vllm.endpoints):
        return ("unavailable on the vllm backend unless every vllm.endpoints[] runs LMCache "
                "blending (lmcache_blend: true)")
    return None


def system_config(system: System, config: Config) -> Config:
    """The config `system` runs with: metis+blend turns on blend in the embedded engine."""
    if system.blend and config.engine.backend != "vllm":
        return replace(config, blend=replace(config.blend, enabled=True))
    return config


def make_planner(system: System, engine: Any, config: Config,
                 learned: LearnedProfiler | None = None, quality: dict[str, Any] | None = None) -> Any:
    """The controller planner of `system` (None for a fixed plan), set up as `serve` sets
    up METIS: the same rules, cost model and LLM profiler (metis.profiler_endpoint);
    `quality`: quality models by collection for `tuned`."""
    if system.kind == "fixed":
        return None
    if system.tuned:
        from ragserve.metis.tuned import TunedPlanner

        if not quality:
            raise BadInput("system tuned needs a quality model: pass --quality SWEEP_DIR (a ragserve tune "
                           "profile of this dataset and model)")
        return TunedPlanner(engine, config, models=quality, learned=learned)
    if system.kind == "adaptive":
        return AdaptivePlanner(engine, config, learned)
    return MetisPlanner(engine, config, learned=learned)


class AdaptivePlanner:
    """AdaptiveRAG* (METIS' quality-only baseline). Implements the controller's `QueryPlanner`.

    Profiles the query like METIS (the same LLM profiler, or the learned one), prunes with
    the same rules, then takes the pruned plan with the largest KV footprint (METIS'
    "more expensive is slightly better" within the quality-safe space), whatever the load.
    Plans that could never run (a call above the engine's context or KV capacity) are
    dropped first. Nothing is reserved: the engine queues what does not fit.
    """

    def __init__(self, engine: Any, config: Config, learned: LearnedProfiler | None = None,
                 profiler: Any = None) -> None:
        self.engine = engine
        self.config = config
        setup = PlannerSetup.build(engine, config)   # METIS' rules and cost model
        self.rules, self.cost, self.max_chunks_needed = setup.rules, setup.cost, setup.max_chunks_needed
        self.learned = learned
        # The LLM profiler runs where METIS' does: metis.profiler_endpoint, else the serving engine.
        self.profiler = profiler or (engine if learned is not None else llm_profiler_engine(config, engine))
        self.max_call_tokens = min(self.cost.model.max_context, engine.stats().kv_capacity_tokens)
        self._builders: dict[str, ProfilePromptBuilder] = {}
        self._tokenizer_verdicts: dict[tuple[str, str], bool] = {}

    async def decide(self, question: str, collection: Any, hits: list[RetrievedChunk],
                     slo_s: float | None = None) -> Decision:
        t0 = time.perf_counter()
        if self.learned is not None:
            profile = self.learned.profile(question)
        else:
            profile = await run_llm_profiler(self.profiler, self._builder(collection), question, SEED_EXAMPLES)
        profile_s = time.perf_counter() - t0
        plans = prune(profile, self.rules, len(hits))
        counts, question_tokens = await prompt_token_counts(self.engine, collection, hits, question,
                                                            self.cost.config.overhead_tokens_per_chunk,
                                                            self._tokenizer_verdicts)
        costs = self.cost.estimate_many(plans, counts, question_tokens)
        runnable = [(c.kv_budget_tokens, i) for i, c in enumerate(costs)
                    if c.max_call_tokens <= self.max_call_tokens and c.kv_tokens <= self.max_call_tokens]
        if runnable:
            _, best = max(runnable)
            reason = "max_quality"
        else:   # nothing runs whole: the smallest plan (the engine reports what does not fit)
            best = min(range(len(plans)), key=lambda i: costs[i].kv_budget_tokens)
            reason = "smallest"
        chosen = PlanDecision(plans[best], reason, profile, tuple(plans), cost=costs[best])
        return Decision(chosen, profile_s=profile_s)

    def done(self, decision: Decision) -> None:
        """Nothing was reserved."""

    def stats(self) -> PlannerStats:
        return PlannerStats()   # nothing waits here: the engine queues what does not fit

    async def close(self) -> None:
        if self.profiler is not self.engine:
            await self.profiler.close()

    def _builder(self, collection: Any) -> ProfilePromptBuilder:
        return profile_builder(self._builders, self.config, collection)
