"""The `ragserve` command as a user runs it: separate processes, real files, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

DOCS = {
    "oil.txt": "The 1973 oil crisis began in October 1973 when the members of OAPEC proclaimed an oil embargo.",
    "notes/plague.md": "The Black Death killed an estimated 75 to 200 million people in Eurasia in the 14th century.",
}


def ragserve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragserve.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ, RAGSERVE_DATA=str(tmp_path_factory.mktemp("cli-data")), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def ingested(cli_env, docs) -> str:
    r = ragserve("ingest", str(docs), "--collection", "notes", "--no-progress", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "+2 chunks" in r.stdout
    return "notes"


def snapshot(env: dict[str, str], name: str) -> dict[str, bytes]:
    root = Path(env["RAGSERVE_DATA"]) / "collections" / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith(".lock")}


def test_reingest_adds_nothing(cli_env, docs, ingested):
    r = ragserve("ingest", str(docs), "--collection", ingested, "--no-progress", env=cli_env)
    assert r.returncode == 0 and "+0 chunks, 2 already stored" in r.stdout


def test_query_json_in_a_new_process(cli_env, ingested):
    r = ragserve("query", "When did the oil crisis begin?", "--collection", ingested,
                 "--plan", "stuff:2", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"]
    assert out["plan"] == {"method": "stuff", "num_chunks": 2, "intermediate_tokens": 0}
    assert len(out["chunks"]) == 2 and out["chunks"][0]["doc_id"].endswith("oil.txt")
    assert set(out["timings"]) >= {"retrieve_s", "queue_s", "ttft_s", "total_s"}
    assert out["tokens"]["prompt"] > 0 and out["tokens"]["output"] > 0
    from ragserve.server.schemas import QueryResponse

    assert set(out) == set(QueryResponse.model_fields)   # the HTTP API's shape
    assert out["profile"] is None and out["decision"] == {}


BAD_QUERIES = [
    (["query", "", "--collection", "notes", "--plan", "stuff:1"], "empty"),
    (["query", "   ", "--collection", "notes", "--plan", "stuff:1"], "empty"),
    (["query", "q?", "--collection", "missing"], "'missing' does not exist"),
    (["query", "q?", "--collection", "notes", "--plan", "summarize:2"], "unknown synthesis method 'summarize'"),
    (["query", "q?", "--collection", "notes", "--plan", "stuff:0"], "num_chunks must be >= 1, got 0"),
    (["query", "q?", "--collection", "notes", "--plan", "stuff:3"], "num_chunks 3 is above the size"),
    (["query", "q?", "--collection", "notes", "--plan", "stuff"], "is not METHOD:NUM_CHUNKS"),
    (["query", "q?", "--collection", "../etc", "--plan", "stuff:1"], "'../etc'"),
]


@pytest.mark.parametrize("args,message", BAD_QUERIES, ids=[m for _, m in BAD_QUERIES])
def test_bad_query_input(cli_env, ingested, args, message):
    before = snapshot(cli_env, ingested)
    r = ragserve(*args, env=cli_env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert snapshot(cli_env, ingested) == before


def test_bad_ingest_input_leaves_collection_untouched(cli_env, ingested, tmp_path):
    before = snapshot(cli_env, ingested)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, message in [(binary, "latin1.txt"), (empty, "empty.jsonl"), (tmp_path / "nope", "nope")]:
        r = ragserve("ingest", str(path), "--collection", ingested, "--no-progress", env=cli_env)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
    assert snapshot(cli_env, ingested) == before


def test_precompute_kv_then_blended_query(cli_env, docs, tmp_path):
    config = tmp_path / "blend.yaml"
    config.write_text("blend:\n  min_tokens: 0\n")   # the test chunks are short: blend them anyway
    first = ragserve("--config", str(config), "ingest", str(docs), "--collection", "kvnotes", "--no-progress",
                     "--precompute-kv", env=cli_env)
    assert first.returncode == 0, first.stderr
    assert "chunk KV of 2 chunks: 3 segments computed" in first.stdout   # + the prompt prefix
    assert list((Path(cli_env["RAGSERVE_DATA"]) / "kv").rglob("*.safetensors"))
    again = ragserve("--config", str(config), "ingest", str(docs), "--collection", "kvnotes", "--no-progress",
                     "--precompute-kv", env=cli_env)
    assert again.returncode == 0 and "0 segments computed" in again.stdout
    r = ragserve("--config", str(config), "query", "When did the oil crisis begin?", "--collection", "kvnotes",
                 "--plan", "stuff:2", "--blend", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["answer"].strip()


def test_precompute_steer_scores_then_steered_query(cli_env, docs, tmp_path):
    config = tmp_path / "blend.yaml"
    config.write_text("blend:\n  min_tokens: 0\n")
    args = ("--config", str(config), "ingest", str(docs), "--collection", "steernotes", "--no-progress")
    bad = ragserve(*args, "--steer", env=cli_env)
    assert bad.returncode == 2 and "add --precompute-kv" in bad.stderr
    assert "collection steernotes" not in bad.stdout        # rejected before ingesting anything
    first = ragserve(*args, "--precompute-kv", "--steer", env=cli_env)
    assert first.returncode == 0, first.stderr
    assert "steering scores of 2 chunks: 2 computed" in first.stdout
    again = ragserve(*args, "--precompute-kv", "--steer", env=cli_env)
    assert again.returncode == 0 and "0 computed (0.0 s), 2 found stored" in again.stdout, again.stdout
    r = ragserve("--config", str(config), "query", "When did the oil crisis begin?", "--collection", "steernotes",
                 "--plan", "stuff:2", "--steer", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["answer"].strip()


def test_blend_check_stores_a_verdict_the_blended_query_reports(cli_env, ingested, tmp_path):
    config = tmp_path / "blend.yaml"
    config.write_text("blend:\n  min_tokens: 0\n")
    r = ragserve("--config", str(config), "blend", "check", "--collection", ingested, "--num-prompts", "2",
                 "--chunks-per-prompt", "2", "--ratios", "0.5,1.0", "--max-kl", "1000", "--min-agreement", "0",
                 "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout)
    assert verdict["ratio"] == 0.5 and verdict["collection"] == ingested
    assert list((Path(cli_env["RAGSERVE_DATA"]) / "kv").rglob(f"meta/gate.{ingested}.json"))
    q = ragserve("--config", str(config), "query", "When did the oil crisis begin?", "--collection", ingested,
                 "--plan", "stuff:2", "--blend", "--json", env=cli_env)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["decision"]["blend"] == {"blend": True, "ratio": 0.5, "source": "gate", "reason": ""}
    bad = ragserve("blend", "check", "--collection", ingested, "--ratios", "2", env=cli_env)
    assert bad.returncode == 2 and "--ratios" in bad.stderr
