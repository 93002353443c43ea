"""Error bodies say what is wrong without misleading (a byte offset is not a field) or
leaking the server's files (temp paths, model folders)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.inprocess import WRITE_KEY, add_collection, app_client

AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}
JSON = {"content-type": "application/json"}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    add_collection("c")
    with app_client() as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/query", "/v1/chat/completions"])
def test_malformed_json_names_no_field(client, path):
    response = client.post(path, content=b'{"query": "x", ', headers=JSON)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON at byte 15 (")


@pytest.mark.parametrize("path", ["/v1/query", "/v1/collections/c/documents"])
def test_deep_nesting_is_422_like_any_bad_json(client, path):
    key = "documents" if "documents" in path else "query"
    body = b'{"%s": ' % key.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post(path, content=body, headers={**JSON, **AUTH})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error" and "not valid JSON" in error["message"]


@pytest.mark.parametrize("data, needle", [(b'{"id": 1, "text": \n', "'a.jsonl' line 1 is not valid JSON"),
                                          (b'{"text": "hi"}\n{"title": "x"}\n', "'a.jsonl' line 2 lacks"),
                                          (b"[" * 100_000 + b"\n", "'a.jsonl' line 1 is not valid JSON")])
def test_multipart_errors_name_the_clients_file_not_a_temp_path(client, data, needle):
    response = client.post("/v1/collections/c/documents", files={"files": ("a.jsonl", data)}, headers=AUTH)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert needle in message and "/tmp" not in message and "ragserve-upload" not in message
