"""The HTTP API against a real server (SmolLM2, a real index): collections, queries,
streaming, auth, validation, limits, disconnects, health and metrics."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server.conftest import COLLECTION, ENV_KEY, QUESTION, WRITE_KEY, ingest, sse_events

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}
SLOW_PLAN = "map_reduce:2:512"   # long summaries: still decoding when the client leaves


def wait_idle(client: httpx.Client, timeout_s: float = 120) -> dict:
    """Poll /v1/stats until no query is in flight and the engine is empty."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get("/v1/stats").json()
        engine = stats["engine"]
        if stats["queries"]["in_flight"] == 0 and engine["num_running"] == 0 and engine["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"server never went idle: {stats}"
        time.sleep(0.2)


# ------------------------------------------------------------------ health

def test_health_ready_and_stats(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"loaded": True, "engine": True}
    stats = client.get("/v1/stats").json()
    assert stats["model"] == "smollm2" and stats["queries"]["limit"] == 8
    assert stats["engine"]["kv_capacity_tokens"] > 0


def test_openapi_documents_both_ingest_bodies(client):
    schema = client.get("/openapi.json").json()
    content = schema["paths"]["/v1/collections/{name}/documents"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "IngestRequest" in schema["components"]["schemas"]


# ------------------------------------------------------------------ collections

def test_ingest_json_is_idempotent_and_returns_ids(client):
    docs = [{"id": "note-1", "title": "Notes", "text": "The blue heron nests near the old mill."},
            {"text": "Otters were seen in the river in 2021.", "metadata": {"source": "survey"}}]
    first = client.post("/v1/collections/api-json/documents", json={"documents": docs}, headers=AUTH)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["document_ids"][0] == "note-1" and body["document_ids"][1].startswith("sha256:")
    assert body["chunk_ids"] == ["note-1#0", body["document_ids"][1] + "#0"]
    assert body["added"] == 2
    again = client.post("/v1/collections/api-json/documents", json={"documents": docs}, headers=AUTH).json()
    assert again["added"] == 0 and again["skipped"] == 2
    assert again["document_ids"] == body["document_ids"] and again["chunk_ids"] == body["chunk_ids"]

    hits = client.post("/v1/collections/api-json/search", json={"query": "where do herons nest?", "k": 1}).json()
    assert hits["chunks"][0]["id"] == "note-1#0"
    filtered = client.post("/v1/collections/api-json/search",
                           json={"query": "animals", "k": 2, "filters": {"source": "survey"}}).json()
    assert [c["doc_id"] for c in filtered["chunks"]] == [body["document_ids"][1]]


def test_ingest_multipart_files(client):
    corpus = b'{"id": "c1", "title": "Tea", "text": "Green tea is made from unoxidized leaves."}\n'
    files = [("files", ("kettle.txt", b"A kettle boils water for tea.", "text/plain")),
             ("files", ("teas.jsonl", corpus, "application/jsonl"))]
    response = client.post("/v1/collections/api-files/documents", files=files, headers={"X-API-Key": ENV_KEY})
    assert response.status_code == 200, response.text
    assert response.json()["document_ids"] == ["kettle.txt", "c1"]
    info = client.get("/v1/collections/api-files").json()
    assert info["num_documents"] == 2 and info["num_chunks"] == 2

    bad = client.post("/v1/collections/api-files/documents", headers=AUTH,
                      files=[("files", ("run.sh", b"echo hi", "text/plain"))])
    assert bad.status_code == 422 and "run.sh" in bad.json()["error"]["message"]


def test_list_inspect_delete(client):
    assert client.post("/v1/collections/api-delete/documents", headers=AUTH,
                       json={"documents": [{"text": "short lived"}]}).status_code == 200
    names = [c["name"] for c in client.get("/v1/collections").json()["collections"]]
    assert {COLLECTION, "api-delete"} <= set(names)
    assert client.get(f"/v1/collections/{COLLECTION}").json()["num_documents"] == 8
    assert client.delete("/v1/collections/api-delete").status_code == 401
    assert client.delete("/v1/collections/api-delete", headers=AUTH).status_code == 204
    missing = client.get("/v1/collections/api-delete")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert client.delete("/v1/collections/api-delete", headers=AUTH).status_code == 404


@pytest.mark.parametrize("path", ["/v1/collections/..", "/v1/collections/.hidden",
                                  "/v1/collections/a%2F..%2Fb", "/v1/collections/" + "x" * 65])
def test_collection_names_cannot_escape(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422)
    if response.status_code == 422:
        assert response.json()["error"]["param"] == "name"
    assert client.post(path + "/documents", json={"documents": [{"text": "x"}]}, headers=AUTH).status_code in (404, 422)


# ------------------------------------------------------------------ auth

def test_writes_need_a_valid_key(client):
    body = {"documents": [{"text": "unauthorized text"}]}
    missing = client.post("/v1/collections/api-auth/documents", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    wrong = client.post("/v1/collections/api-auth/documents", json=body, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "forbidden"
    assert client.get("/v1/collections/api-auth").status_code == 404   # nothing was written


# ------------------------------------------------------------------ validation and limits

@pytest.mark.parametrize("body,field", [
    ({"query": "x" * 4001, "collection": COLLECTION}, "query"),
    ({"query": "   ", "collection": COLLECTION}, "query"),
    ({"query": "q?", "collection": "../etc"}, "collection"),
    ({"query": "q?", "collection": COLLECTION, "slo_ms": -5}, "slo_ms"),
    ({"query": "q?", "collection": COLLECTION, "plan": "stuff:zero"}, "plan"),
    ({"query": "q?", "collection": COLLECTION, "plan": {"method": "stuff", "num_chunks": 0}}, "plan"),
    ({"query": "q?", "collection": COLLECTION, "unknown": 1}, "unknown"),
])
def test_query_validation_names_the_field(client, body, field):
    response = client.post("/v1/query", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error" and error["param"].split(".")[0] == field


def test_plan_larger_than_collection_is_422(client):
    response = client.post("/v1/query", json={"query": QUESTION, "collection": COLLECTION, "plan": "stuff:9"})
    assert response.status_code == 422 and "num_chunks 9" in response.json()["error"]["message"]


def test_unknown_collection_is_404(client):
    response = client.post("/v1/query", json={"query": QUESTION, "collection": "no-such-collection"})
    assert response.status_code == 404 and "no-such-collection" in response.json()["error"]["message"]


def test_body_size_limit_is_413(client):
    big = {"documents": [{"text": "word " * 60_000}]}          # ~300 KB > 256 KiB
    response = client.post("/v1/collections/api-big/documents", json=big, headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"


def test_ingest_beyond_its_queue_is_503_with_retry_after(server, client):
    """max_ingest_queue is 1: an ingest arriving while another runs is turned away."""
    words = " ".join(f"w{i}" for i in range(1500))       # ~10 KB: chunking takes a while
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(
        ingest(server.url, "api-busy", [{"id": "big", "text": words}])))
    thread.start()
    while client.get("/v1/stats").json()["ingests"]["in_flight"] == 0 and thread.is_alive():
        time.sleep(0.01)
    busy = ingest(server.url, "api-busy", [{"id": "small", "text": "a short one"}])
    thread.join()
    assert first[0].status_code == 200, first[0].text
    assert busy.status_code == 503, busy.text
    assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["type"] == "overloaded"


def test_non_json_body_is_422(client):
    response = client.post("/v1/query", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


# ------------------------------------------------------------------ queries

def test_query_with_a_given_plan(client):
    response = client.post("/v1/query", json={"query": QUESTION, "collection": COLLECTION, "plan": "stuff:2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"]
    assert body["plan"] == {"method": "stuff", "num_chunks": 2, "intermediate_tokens": 0}
    assert body["profile"] is None and len(body["chunks"]) == 2
    assert body["chunks"][0]["doc_id"] == "squad_p0000"
    assert body["timings"]["total_s"] >= body["timings"]["ttft_s"] > 0
    assert body["num_calls"] == 1 and body["tokens"]["output"] >= 1
    metrics = client.get("/metrics").text
    assert 'ragserve_plans_chosen_total{method="stuff",reason="given"}' in metrics


def test_query_planned_by_metis(client):
    response = client.post("/v1/query", json={"query": QUESTION, "collection": COLLECTION, "slo_ms": 1500})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["profile"]["source"] in ("llm", "fallback")
    assert 0.0 <= body["profile"]["confidence"] <= 1.0
    assert body["decision"]["reason"] in ("fit", "slo", "fallback")
    assert body["plan"]["method"] in ("stuff", "map_rerank", "map_reduce", "refine")


def test_query_stream_sends_plan_then_tokens_then_done(client):
    with client.stream("POST", "/v1/query", json={"query": QUESTION, "collection": COLLECTION,
                                                  "plan": {"method": "stuff", "num_chunks": 1},
                                                  "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    names = [name for name, _ in events]
    assert names[0] == "plan" and names[-1] == "done" and "token" in names
    assert set(names[1:-1]) == {"token"}
    assert events[0][1]["plan"]["method"] == "stuff"
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed.strip() == events[-1][1]["answer"]


def test_query_timeout_is_504_and_releases_the_slot(client):
    response = client.post("/v1/query", json={"query": QUESTION, "collection": COLLECTION,
                                              "plan": "stuff:1", "timeout_ms": 50})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    stats = wait_idle(client)
    assert stats["cancelled"].get("timeout", 0) >= 1


def test_client_disconnect_cancels_the_query(server, client):
    before = client.get("/v1/stats").json()["cancelled"].get("disconnect", 0)
    body = {"query": QUESTION, "collection": COLLECTION, "plan": SLOW_PLAN}

    def doomed():
        try:
            httpx.post(server.url + "/v1/query", json=body, timeout=1.5)
        except httpx.TimeoutException:
            pass   # the client gives up and closes the connection

    thread = threading.Thread(target=doomed)
    thread.start()
    thread.join()
    stats = wait_idle(client)   # the engine stops decoding the cancelled calls
    assert stats["cancelled"]["disconnect"] == before + 1


def test_stream_disconnect_cancels_the_query(server, client):
    before = client.get("/v1/stats").json()["cancelled"].get("disconnect", 0)
    with httpx.Client(base_url=server.url, timeout=300) as own:
        with own.stream("POST", "/v1/query", json={"query": QUESTION, "collection": COLLECTION,
                                                   "plan": SLOW_PLAN, "stream": True}) as response:
            first = next(response.iter_lines())
            assert first == "event: plan"
        # leaving the block closes the connection mid-stream
    stats = wait_idle(client)
    assert stats["cancelled"]["disconnect"] == before + 1


# ------------------------------------------------------------------ metrics

def test_metrics_exposes_queue_plans_kv_latency_confidence(client):
    text = client.get("/metrics").text
    for name in ("ragserve_queue_depth", "ragserve_plans_chosen_total", "ragserve_kv_free_tokens",
                 "ragserve_ttft_seconds_bucket", "ragserve_query_latency_seconds_bucket",
                 "ragserve_profiler_confidence_bucket", "ragserve_http_requests_total"):
        assert name in text, name
