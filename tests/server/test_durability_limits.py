"""Crash safety and the server's limits, on a server of their own:

1. kill -9 while documents are being ingested, restart on the same data: every
   acknowledged document is searchable;
2. on the restarted server (max_queue 1, keys required for queries): 401/403, 503 with
   Retry-After beyond the queue, and SIGTERM draining an in-flight query.
"""
from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import BASE_CONFIG, ENV_KEY, WRITE_KEY, ServerProcess, merge, sse_events, tiny_documents

# Two server starts (~60 s on a busy 2-core machine) before the first test: run with -m slow.
pytestmark = [pytest.mark.model, pytest.mark.slow]

COLLECTION = "durable"
AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}
CONFIG = merge(BASE_CONFIG, {"server": {"max_queue": 1, "require_key_for_queries": True}})


class Writer(threading.Thread):
    """Ingests one document per request, back to back, recording what was acknowledged."""

    def __init__(self, url: str, docs: list[dict]) -> None:
        super().__init__(daemon=True)
        self.url, self.docs = url, docs
        self.acked: list[dict] = []
        self.in_flight = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300, headers=AUTH) as client:
            for doc in self.docs:
                self.in_flight.set()
                try:
                    response = client.post(f"/v1/collections/{COLLECTION}/documents", json={"documents": [doc]})
                except httpx.TransportError:   # the server died
                    return
                finally:
                    self.in_flight.clear()
                assert response.status_code == 200, response.text
                self.acked.append(doc)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("durability")
    data = workdir / "data"
    first = ServerProcess(workdir, data, CONFIG).start()
    try:
        first.wait_ready()
        writer = Writer(first.url, tiny_documents(60, offset=8))
        writer.start()
        deadline = time.monotonic() + 300
        while len(writer.acked) < 5 or not writer.in_flight.is_set():
            assert writer.is_alive() and time.monotonic() < deadline, first.log_tail()
            time.sleep(0.01)
        time.sleep(0.05)   # into the request: chunking, embedding or the commit
        first.kill9()
        writer.join(60)
    finally:
        first.terminate()
    second = ServerProcess(workdir, data, CONFIG).start()
    try:
        second.wait_ready()
        yield second, writer
    finally:
        second.terminate()


def test_acknowledged_ingests_survive_kill9(restarted):
    server, writer = restarted
    assert len(writer.acked) >= 5
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        info = client.get(f"/v1/collections/{COLLECTION}").json()
        assert info["num_documents"] >= len(writer.acked)
        for doc in writer.acked:
            hits = client.post(f"/v1/collections/{COLLECTION}/search", json={"query": doc["text"], "k": 1}).json()
            assert hits["chunks"][0]["doc_id"] == doc["id"]


def test_queries_need_a_key_when_configured(restarted):
    server, _ = restarted
    body = {"query": "What happened?", "collection": COLLECTION, "plan": "stuff:1"}
    missing = httpx.post(server.url + "/v1/query", json=body, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "unauthorized"
    wrong = httpx.post(server.url + "/v1/query", json=body, headers={"X-API-Key": "wrong"}, timeout=60)
    assert wrong.status_code == 403
    assert httpx.get(server.url + "/v1/collections", timeout=60).status_code == 401
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=f"rag:{COLLECTION}", messages=[{"role": "user", "content": "hi"}])


def test_beyond_max_queue_is_503_with_retry_after(restarted):
    server, _ = restarted
    headers = {"X-API-Key": ENV_KEY}
    body = {"query": "What is this about?", "collection": COLLECTION, "plan": "map_reduce:3:512", "stream": True}
    with httpx.Client(base_url=server.url, timeout=300, headers=headers) as client:
        with client.stream("POST", "/v1/query", json=body) as running:      # holds the only slot
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(lines) == "event: plan"
            stats = client.get("/v1/stats").json()
            rejected = client.post("/v1/query", json={**body, "stream": False})
            assert rejected.status_code == 503, (stats, rejected.text[:300], list(lines)[-8:])
            assert int(rejected.headers["retry-after"]) >= 1
            assert rejected.json()["error"]["type"] == "overloaded"
        deadline = time.monotonic() + 120
        while client.get("/v1/stats").json()["queries"]["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "ragserve_rejected_total" in client.get("/metrics").text


def test_sigterm_drains_the_in_flight_query(restarted):
    server, _ = restarted
    result: dict = {}

    def ask():
        with httpx.stream("POST", server.url + "/v1/query", headers=AUTH, timeout=300,
                          json={"query": "What is this about?", "collection": COLLECTION,
                                "plan": "stuff:2", "stream": True}) as response:
            result["status"] = response.status_code
            result["events"] = sse_events(response.iter_lines())

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/v1/stats", timeout=30).json()["queries"]["in_flight"] == 0:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    code = server.terminate()
    thread.join(300)
    assert result["status"] == 200 and result["events"][-1][0] == "done"
    assert code in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after a clean shutdown
    log = server.log_tail(80)
    assert "shutting down" in log and "Application shutdown complete" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/healthz", timeout=5)
