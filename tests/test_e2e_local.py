"""Ingest -> query end to end on the embedded engine: real SmolLM2, real index."""
from __future__ import annotations

import asyncio

import pytest

from ragserve.config import Config, SynthesisConfig
from ragserve.controller import Controller
from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, NotFound
from ragserve.retrieval.ingest import Retriever
from tests.conftest import shared_embedder

pytestmark = pytest.mark.model

QUESTION = "When did oil start getting priced in the terms of gold?"   # gold passage squad_p0002
CALLS = {Method.STUFF: lambda n: 1, Method.MAP_RERANK: lambda n: n,
         Method.MAP_REDUCE: lambda n: n + 1, Method.REFINE: lambda n: n}


@pytest.fixture(scope="module")
def controller(smollm2_engine, small_squad):
    config = Config(synthesis=SynthesisConfig(answer_tokens=16, default_intermediate_tokens=24))
    return Controller(smollm2_engine, Retriever(shared_embedder()), config)


@pytest.mark.parametrize("plan", [RagPlan(Method.STUFF, 3), RagPlan(Method.MAP_RERANK, 3),
                                  RagPlan(Method.MAP_REDUCE, 3, 24), RagPlan(Method.REFINE, 2, 24)],
                         ids=str)
def test_each_method_answers(controller, small_squad, plan):
    r = asyncio.run(controller.query(QUESTION, small_squad, plan))
    assert r.answer.strip()
    assert r.plan == plan
    assert len(r.chunks) == plan.num_chunks
    assert r.chunks[0].chunk.doc_id == "squad_p0002"          # the gold passage ranks first
    assert [c.score for c in r.chunks] == sorted((c.score for c in r.chunks), reverse=True)
    assert r.num_calls == CALLS[plan.method](plan.num_chunks)
    assert r.prompt_tokens > 0 and r.output_tokens > 0
    t = r.timings
    assert 0 < t.retrieve_s <= t.ttft_s <= t.total_s
    out = r.to_dict()
    assert set(out) >= {"answer", "plan", "chunks", "timings", "tokens"}
    assert out["plan"] == {"method": plan.method.value, "num_chunks": plan.num_chunks,
                           "intermediate_tokens": plan.intermediate_tokens}
    assert set(out["timings"]) >= {"retrieve_s", "queue_s", "ttft_s", "total_s"}


@pytest.mark.slow
def test_qwen_stuff_finds_the_answer(small_squad):
    """SmolLM2 is too small to answer reliably; the quality model must."""
    from ragserve.config import EngineConfig
    from ragserve.engines.local.engine import LocalEngine

    engine = LocalEngine(EngineConfig(model="qwen"))
    try:
        c = Controller(engine, Retriever(shared_embedder()), Config(synthesis=SynthesisConfig(answer_tokens=16)))
        r = asyncio.run(c.query(QUESTION, small_squad, RagPlan(Method.STUFF, 2)))
    finally:
        asyncio.run(engine.close())
    assert "1971" in r.answer


def test_metadata_filter_restricts_chunks(controller, small_squad):
    r = asyncio.run(controller.query(QUESTION, small_squad, RagPlan(Method.STUFF, 2),
                                     filters={"doc_id": "squad_p0030"}))
    assert {c.chunk.doc_id for c in r.chunks} == {"squad_p0030"}


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_query_is_rejected(controller, small_squad, question):
    with pytest.raises(BadInput, match="empty"):
        asyncio.run(controller.query(question, small_squad, RagPlan(Method.STUFF, 1)))


def test_unknown_collection(controller, small_squad):
    with pytest.raises(NotFound, match="'nope' does not exist"):
        asyncio.run(controller.query(QUESTION, "nope", RagPlan(Method.STUFF, 1)))


def test_num_chunks_above_collection_size(controller, small_squad):
    with pytest.raises(BadInput, match=r"num_chunks 100000 is above the size"):
        asyncio.run(controller.query(QUESTION, small_squad, RagPlan(Method.STUFF, 100000)))
