"""`ragserve serve` with `retrieval.store: milvus` (real Milvus Lite inside the server process):
the same API as on FAISS — ingest, list, search with filters, query, OpenAI models, delete."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import BASE_CONFIG, COLLECTION, QUESTION, WRITE_KEY, merge, running_server

pytest.importorskip("pymilvus")
pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}


def test_server_runs_unchanged_on_milvus(tmp_path):
    config = merge(BASE_CONFIG, {"retrieval": {"store": "milvus"}})
    with running_server(tmp_path, config) as proc, httpx.Client(base_url=proc.url, timeout=300) as client:
        assert (tmp_path / "data" / "milvus.db").is_dir()              # the collection lives in Milvus Lite
        assert not (tmp_path / "data" / "collections" / COLLECTION).exists()
        info = client.get(f"/v1/collections/{COLLECTION}").json()
        assert info["num_documents"] == 8 and info["num_chunks"] >= 8 and info["generation"] == 1
        docs = [{"id": "n1", "text": "Herons nest in tall trees near water.", "metadata": {"source": "survey"}},
                {"id": "n2", "text": "Trains now run on electricity.", "metadata": {"source": "news"}}]
        assert client.post("/v1/collections/notes/documents", json={"documents": docs}, headers=AUTH).json()["added"] == 2
        hits = client.post("/v1/collections/notes/search",
                           json={"query": "birds", "k": 2, "filters": {"source": "news"}}).json()["chunks"]
        assert [h["doc_id"] for h in hits] == ["n2"]
        names = {c["name"] for c in client.get("/v1/collections").json()["collections"]}
        assert names == {COLLECTION, "notes"}
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {f"rag:{COLLECTION}", "rag:notes"}
        answer = client.post("/v1/query", json={"query": QUESTION, "collection": COLLECTION, "plan": "stuff:2"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["plan"]["num_chunks"] == 2 and len(answer.json()["chunks"]) == 2
        assert client.delete("/v1/collections/notes", headers=AUTH).status_code == 204
        assert client.get("/v1/collections/notes").status_code == 404
