"""A damaged collection on disk (torn index, cut docstore) over HTTP: the others still serve,
the listing and /readyz name it, calls on it say how to get out, rollback restores it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.inprocess import WRITE_KEY, add_collection, app_client

AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def current_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "collections" / name / (data_dir / "collections" / name / "CURRENT").read_text().strip()


def tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["index.faiss", "chunks.jsonl"])
def test_damaged_collection_is_listed_and_named_and_the_rest_serve(data_dir: Path, damage: str):
    add_collection("good")
    add_collection("bad", n=3)
    add_collection("bad", n=5)            # a second generation; the first is kept for rollback
    tear(current_dir(data_dir, "bad") / damage)
    with app_client() as client:
        listing = client.get("/v1/collections")
        assert listing.status_code == 200, listing.text
        by_name = {c["name"]: c for c in listing.json()["collections"]}
        assert by_name["good"]["status"] == "ok" and by_name["good"]["num_chunks"] == 4
        assert by_name["bad"]["status"] == "damaged"
        assert "rollback bad" in by_name["bad"]["error"] and damage in by_name["bad"]["error"]

        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert list(ready.json()["damaged_collections"]) == ["bad"]

        for response in (client.get("/v1/collections/bad"),
                         client.post("/v1/query", json={"query": "q?", "collection": "bad", "plan": "stuff:1"}),
                         client.post("/v1/collections/bad/search", json={"query": "q?"})):
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["type"] == "collection_damaged"
            assert "'bad'" in error["message"] and "re-ingest" in error["message"]

        ok = client.post("/v1/query", json={"query": "q?", "collection": "good", "plan": "stuff:1"})
        assert ok.status_code == 200, ok.text

        rolled = client.post("/v1/collections/bad/rollback", headers=AUTH)
        assert rolled.status_code == 200, rolled.text
        assert client.get("/v1/collections/bad").json()["num_chunks"] == 3   # the first ingest
        assert client.get("/readyz").json()["status"] == "ready"


def test_collection_info_names_the_tokenizer_not_a_server_path(data_dir: Path):
    from ragserve.retrieval.store import Collection
    from retrieval_factories import make_chunks, make_spec, make_vectors
    from dataclasses import replace

    spec = replace(make_spec(), tokenizer="/home/someone/.cache/ragserve/smollm2-135m")
    Collection.create_or_open("docs", spec).add(make_chunks(2), make_vectors(2))
    with app_client() as client:
        body = client.get("/v1/collections/docs").json()
    assert body["tokenizer"] == "smollm2-135m"
    assert "/home" not in str(body)
