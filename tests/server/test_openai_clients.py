"""Real clients against a real server: the openai package (plain and streaming),
LangChain's ChatOpenAI, and ragserve's own LangChain integration."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import COLLECTION, QUESTION, sse_events

pytestmark = pytest.mark.model

PLAN = {"plan": "stuff:2"}     # ragserve extension, sent with extra_body


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_openai_chat_completion(oai):
    completion = oai.chat.completions.create(
        model=f"rag:{COLLECTION}", extra_body=PLAN,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    extra = completion.model_extra["ragserve"]
    assert extra["plan"]["num_chunks"] == 2 and extra["chunks"][0]["doc_id"] == "squad_p0000"


def test_max_tokens_caps_the_answer_and_says_length(oai):
    completion = oai.chat.completions.create(
        model=f"rag:{COLLECTION}", extra_body=PLAN, max_tokens=1, temperature=0.7,
        messages=[{"role": "user", "content": QUESTION}])
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 1
    assert completion.model_extra["ragserve"]["ignored_params"] == ["temperature"]


def test_openai_streaming(oai):
    stream = oai.chat.completions.create(model=f"rag:{COLLECTION}", extra_body=PLAN, stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": QUESTION}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")   # answer_tokens is 8 here
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    done = [c.model_extra["ragserve"] for c in chunks if (c.model_extra or {}).get("ragserve", {}).get("event") == "done"]
    assert done and done[0]["answer"] == text.strip()


def test_collection_from_header(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300,
                           default_headers={"X-RAG-Collection": COLLECTION})
    completion = client.chat.completions.create(model="anything", extra_body={"plan": "stuff:1"},
                                                messages=[{"role": "user", "content": QUESTION}])
    assert completion.choices[0].message.content


def test_openai_errors_surface_as_exceptions(oai):
    with pytest.raises(openai.NotFoundError, match="no-such"):
        oai.chat.completions.create(model="rag:no-such", messages=[{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.UnprocessableEntityError, match="no user message"):
        oai.chat.completions.create(model=f"rag:{COLLECTION}", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="names no collection"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])


def test_models_lists_collections(oai):
    assert f"rag:{COLLECTION}" in [m.id for m in oai.models.list()]


def test_raw_sse_ends_with_done(server):
    body = {"model": f"rag:{COLLECTION}", "plan": "stuff:1", "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == ("message", "[DONE]")
    assert all(e[1]["object"] == "chat.completion.chunk" for e in events[:-1])


def test_langchain_chat_openai(server):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=f"rag:{COLLECTION}",
                     extra_body={"plan": "stuff:1"}, max_retries=0, timeout=300)
    reply = llm.invoke([HumanMessage(QUESTION)])
    assert reply.content.strip()
    pieces = [chunk.content for chunk in llm.stream(QUESTION)]
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_integration_runnable_and_retriever_over_http(server):
    from ragserve.integrations.langchain import RagServeQuery, RagServeRetriever

    rag = RagServeQuery(collection=COLLECTION, base_url=server.url, plan="stuff:1")
    out = rag.invoke(QUESTION)
    assert out["answer"] and out["plan"]["method"] == "stuff"
    docs = RagServeRetriever(collection=COLLECTION, base_url=server.url, k=2).invoke("1973 oil crisis")
    assert len(docs) == 2 and docs[0].metadata["doc_id"] == "squad_p0000"


def test_integration_retriever_in_process(server, monkeypatch):
    """The in-process retriever reads the same collection files the server wrote."""
    from ragserve.integrations.langchain import RagServeRetriever

    monkeypatch.setenv("RAGSERVE_DATA", str(server.data_dir))
    docs = RagServeRetriever(collection=COLLECTION, k=3).invoke("oil embargo price per barrel")
    assert len(docs) == 3 and docs[0].metadata["doc_id"] == "squad_p0000"
    assert docs[0].page_content and 0 < docs[0].metadata["score"] <= 1
