"""max_tokens caps the answer and finish_reason reports the cap (fake engine, real routes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.inprocess import FakeEngine, add_collection, app_client


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    add_collection("c")


@pytest.mark.parametrize("plan", ["stuff:2", "map_rerank:2", "map_reduce:2:16", "refine:2:16"])
def test_max_tokens_caps_the_answering_call(data, plan):
    engine = FakeEngine()
    with app_client(engine) as client:
        response = client.post("/v1/chat/completions", json={
            "model": "rag:c", "messages": [{"role": "user", "content": "q?"}], "max_tokens": 5, "plan": plan})
    assert response.status_code == 200, response.text
    last_batch = engine.calls[-2:] if plan.startswith("map_rerank") else engine.calls[-1:]
    assert [c.max_tokens for c in last_batch] == [5] * len(last_batch)   # the calls that write the answer
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_never_raises_the_servers_cap(data):
    engine = FakeEngine()
    with app_client(engine) as client:
        client.post("/v1/query", json={"query": "q?", "collection": "c", "plan": "stuff:1", "max_tokens": 30000})
    assert engine.calls[-1].max_tokens == 64   # synthesis.answer_tokens: plans are priced with it


@pytest.mark.parametrize("plan", ["stuff:2", "map_rerank:2"])
def test_capped_answer_reports_length(data, plan):
    with app_client(FakeEngine(finish="length")) as client:
        chat = client.post("/v1/chat/completions", json={
            "model": "rag:c", "messages": [{"role": "user", "content": "q?"}], "plan": plan})
        query = client.post("/v1/query", json={"query": "q?", "collection": "c", "plan": plan})
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "rag:c", "messages": [{"role": "user", "content": "q?"}], "plan": plan,
                "stream": True}) as stream:
            finishes = [line for line in stream.iter_lines() if '"finish_reason": "length"' in line]
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    assert query.json()["finish_reason"] == "length"
    assert len(finishes) == 1


def test_ignored_sampling_params_are_named(data):
    with app_client() as client:
        body = client.post("/v1/chat/completions", json={
            "model": "rag:c", "messages": [{"role": "user", "content": "q?"}], "plan": "stuff:1",
            "temperature": 0.7, "top_p": 0.9, "presence_penalty": 1.0}).json()
    assert body["ragserve"]["ignored_params"] == ["temperature", "top_p", "presence_penalty"]
