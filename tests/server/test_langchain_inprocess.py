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


# ---------------------------------------------------------------- over HTTP, against the in-process app

import httpx  # noqa: E402
import pytest  # noqa: E402

from ragserve.errors import AdmissionRejected, BadInput, EngineUnavailable, NotFound  # noqa: E402
from ragserve.integrations import langchain as lc  # noqa: E402
from tests.server.inprocess import add_collection, app_client  # noqa: E402


@pytest.fixture
def http_app(tmp_path, monkeypatch):
    """Routes the integration's httpx.post to the in-process app; records the URLs it asked."""
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    add_collection("docs")
    urls: list[str] = []
    with app_client() as client:
        def post(url, timeout=None, **kwargs):   # TestClient takes no timeout
            urls.append(url)
            return client.post(url, **kwargs)
        monkeypatch.setattr(lc.httpx, "post", post)
        yield urls


def test_retriever_over_http_quotes_the_collection_name(http_app):
    docs = lc.RagServeRetriever(collection="docs", base_url="http://testserver", k=2).invoke("q?")
    assert len(docs) == 2 and docs[0].metadata["doc_id"] == "docs"
    # A name with path characters stays one path segment: it cannot reach another route.
    with pytest.raises((NotFound, BadInput)):
        lc.RagServeRetriever(collection="docs/../docs", base_url="http://testserver").invoke("q?")
    assert http_app[-1] == "http://testserver/v1/collections/docs%2F..%2Fdocs/search"


def response(status: int, kind: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": f"{kind} here", "param": None}},
                          headers=headers)


@pytest.mark.parametrize("status, kind, exc, needle", [
    (503, "overloaded", AdmissionRejected, "retry after 3 s"),
    (503, "engine_unavailable", EngineUnavailable, "engine_unavailable here"),
    (401, "unauthorized", lc.AccessDenied, "pass api_key="),
    (403, "forbidden", lc.AccessDenied, "pass api_key="),
    (413, "payload_too_large", lc.RequestTooLarge, "fewer or smaller documents"),
    (409, "collection_damaged", lc.CollectionDamaged, "collection_damaged here"),
    (404, "not_found", NotFound, "not_found here"),
])
def test_server_errors_map_to_their_exceptions(status, kind, exc, needle):
    with pytest.raises(exc, match=needle) as info:
        lc._raise_for(response(status, kind, {"Retry-After": "3"}))
    if exc is AdmissionRejected:
        assert info.value.retry_after_s == 3.0
