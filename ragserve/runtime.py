"""Assembles engine + retriever + controller from settings (the CLI and server share it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragserve.config import Config
from ragserve.controller import Controller
from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput
from ragserve.retrieval.base import open_store
from ragserve.retrieval.embeddings import Embedder
from ragserve.retrieval.ingest import Retriever

DEFAULT_PLAN = RagPlan(Method.STUFF, 4)


def parse_plan(text: str) -> RagPlan:
    """METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS], e.g. map_reduce:6:64."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise BadInput(f"plan {text!r} is not METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS] (e.g. stuff:4, map_reduce:6:64)")
    try:
        method = Method.parse(parts[0])
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise BadInput(f"plan {text!r}: NUM_CHUNKS and INTERMEDIATE_TOKENS must be integers") from None
    if numbers[0] < 1:
        raise BadInput(f"plan {text!r}: num_chunks must be >= 1, got {numbers[0]}")
    inter = numbers[1] if len(numbers) == 2 else 0
    if not 0 <= inter <= 1024:
        raise BadInput(f"plan {text!r}: intermediate_tokens must be in [0, 1024], got {inter}")
    return RagPlan(method, numbers[0], inter)


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
