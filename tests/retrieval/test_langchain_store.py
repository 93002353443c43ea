"""LangChain both ways: a ragserve collection (FAISS and real Milvus Lite) as a LangChain
VectorStore/retriever, and a LangChain InMemoryVectorStore served as a ragserve collection."""
from __future__ import annotations

import pytest
from retrieval_factories import squad_records

from ragserve.config import RetrievalConfig

pytest.importorskip("langchain_core")
pytest.importorskip("pymilvus")


@pytest.fixture(params=["faiss", "milvus"])
def kind(request):
    yield request.param
    from ragserve.retrieval.milvus_store import MilvusStore

    MilvusStore.close_all()


def test_collection_as_langchain_vector_store(kind, tokenizer, embedder):
    from ragserve.integrations.langchain_store import RagServeVectorStore

    rows = squad_records(6)
    store = RagServeVectorStore("lc", config=RetrievalConfig(store=kind), embedder=embedder, tokenizer=tokenizer)
    ids = store.add_texts([r["text"] for r in rows], [{"title": r["title"], "n": i} for i, r in enumerate(rows)],
                          ids=[r["id"] for r in rows])
    assert ids == [r["id"] for r in rows]
    assert store.add_texts([rows[0]["text"]], ids=[rows[0]["id"]]) == [rows[0]["id"]]   # idempotent
    question = rows[2]["text"][:120]
    docs = store.as_retriever(search_kwargs={"k": 2}).invoke(question)
    assert len(docs) == 2 and docs[0].metadata["doc_id"] == rows[2]["id"]
    hits = store.similarity_search_with_score(question, k=3, filter={"n": [0, 1]})
    assert {d.metadata["n"] for d, _ in hits} <= {0, 1} and hits[0][1] >= hits[-1][1]
    assert store.get_by_ids([docs[0].id])[0].page_content == docs[0].page_content
    assert store.delete([rows[2]["id"]]) is True
    after = store.similarity_search(question, k=6)
    assert rows[2]["id"] not in {d.metadata["doc_id"] for d in after}


def test_langchain_store_served_as_a_ragserve_collection(tokenizer, embedder):
    from langchain_core.vectorstores import InMemoryVectorStore

    from ragserve.integrations.langchain_store import LangChainStore, RagServeEmbeddings
    from ragserve.retrieval.ingest import Retriever

    rows = squad_records(5)
    lc = InMemoryVectorStore(RagServeEmbeddings(embedder))
    lc.add_texts([r["text"] for r in rows], [{"doc_id": r["id"], "title": r["title"]} for r in rows],
                 ids=[f"{r['id']}#0" for r in rows])
    retriever = Retriever(embedder, LangChainStore({"theirs": lc}, tokenizer))
    hits, _ = retriever.retrieve("theirs", rows[3]["text"][:120], k=2)
    assert hits[0].chunk.id == f"{rows[3]['id']}#0" and hits[0].chunk.doc_id == rows[3]["id"]
    assert hits[0].chunk.num_tokens == len(tokenizer.encode(rows[3]["text"], add_special_tokens=False))
    assert hits[0].score > hits[1].score
    assert retriever.store.list_collections() == ["theirs"]
