"""Assembles engine + retriever + controller from settings (the CLI and server share it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragserve.config import Config
from ragserve.controller import Controller
from ragserve.domain import Method, RagPlan
from ragserve.retrieval.base import open_store
from ragserve.retrieval.embeddings import Embedder
from ragserve.retrieval.ingest import Retriever

DEFAULT_PLAN = RagPlan(Method.STUFF, 4)


@dataclass
class Runtime:
    config: Config
    controller: Controller
    engine: Any
    retriever: Retriever
    planner: Any = None

    async def close(self) -> None:
        if self.planner is not None:
            await self.planner.close()
        await self.engine.close()


def build_runtime(config: Config, *, metis: bool = True) -> Runtime:
    """Engine + retriever + controller. With `metis`, queries without a plan are planned (the
    tuned controller, or METIS per `tuned.planner`); without, they run DEFAULT_PLAN."""
    from ragserve.metis.planner import MetisPlanner

    if config.engine.backend == "vllm":
        from ragserve.engines.vllm import VllmEngine

        engine = VllmEngine(config.vllm, config.engine)
    else:
        from ragserve.engines.local.engine import LocalEngine

        engine = LocalEngine(config.engine, blend=config.blend, steer=config.steer)
    embedder, learned = Embedder(), None
    if config.metis.learned_profiler:   # the fast profiler, sharing the query embedding with retrieval
        from ragserve.metis.learned import CachedQueryEmbedder, load_profiler

        embedder = CachedQueryEmbedder(embedder)
        learned = load_profiler(config.metis.learned_profiler, embedder=embedder) if metis else None
    retriever = Retriever(embedder, open_store(config.retrieval))
    planner = None
    if metis and config.tuned.planner == "metis":
        planner = MetisPlanner(engine, config, learned=learned)
    elif metis:   # tuned where a collection has a quality model, METIS' rules elsewhere
        from ragserve.metis.tuned import TunedPlanner

        planner = TunedPlanner(engine, config, learned=learned)
    controller = Controller(engine, retriever, config, planner=planner, default_plan=DEFAULT_PLAN)
    return Runtime(config, controller, engine, retriever, planner)
