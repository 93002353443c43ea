"""The LangChain runnable over an in-process controller (fakes, no model or server)."""
from __future__ import annotations

import asyncio

from ragserve.config import Config
from ragserve.controller import Controller
from ragserve.integrations.langchain import RagServeQuery
from tests.server.test_query_stream import FakeEngine, FakeRetriever


def test_runnable_with_an_in_process_controller():
    rag = RagServeQuery(collection="c", controller=Controller(FakeEngine(), FakeRetriever(4), Config()),
                        plan="map_reduce:2:16")
    out = rag.invoke({"question": "q?"})
    assert out["answer"] == "answer from reduce"
    assert out["plan"] == {"method": "map_reduce", "num_chunks": 2, "intermediate_tokens": 16}
    assert [c["doc_id"] for c in out["chunks"]] == ["d0", "d1"]
    assert asyncio.run(rag.ainvoke("q?"))["answer"] == out["answer"]
    assert rag.batch(["q1?", "q2?"])[1]["num_calls"] == 3
