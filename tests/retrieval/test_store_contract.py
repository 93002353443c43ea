"""The vector-store contract (retrieval/base.py) on both backends: FAISS files and real
Milvus Lite (embedded, a .db file under the test's data dir). Nothing is mocked.

Vectors are random unit vectors of dim 8; the dataset-filter test embeds real qmsum passages.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from retrieval_factories import make_chunks, make_spec, make_vectors

from ragserve.config import Config, RetrievalConfig
from ragserve.domain import Chunk
from ragserve.errors import BadInput, ConfigError, NotFound
from ragserve.retrieval.base import open_store

pytest.importorskip("pymilvus", reason="the Milvus store needs the scale extra: pip install -e '.[scale]'")

REPO = Path(__file__).resolve().parents[2]


def config_of(kind: str) -> RetrievalConfig:
    return RetrievalConfig(store=kind)


@pytest.fixture(params=["faiss", "milvus"])
def store(request):
    yield open_store(config_of(request.param))
    _close_milvus()


def _close_milvus() -> None:
    from ragserve.retrieval.milvus_store import MilvusStore

    MilvusStore.close_all()


def run_python(code: str, data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGSERVE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    code = "import sys; sys.path.insert(0, 'tests/retrieval')\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_first_add_creates_and_search_is_cosine(store):
    col = store.create_or_open("docs", make_spec())
    assert len(col) == 0 and store.list_collections() == [] and store.version("docs") is None
    assert col.add(make_chunks(6), make_vectors(6)) == (6, 0, 0)
    assert store.list_collections() == ["docs"] and store.version("docs") == col.generation == 1
    vectors = make_vectors(6)
    hits = store.open("docs").search(vectors[2] * 3.0, k=3)
    assert hits[0].chunk.id == "doc#2" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert np.allclose([h.score for h in hits], np.sort(vectors @ vectors[2])[::-1][:3], atol=1e-5)
    assert store.open("docs").num_documents == 1


def test_dedupe_by_content_hash_and_no_empty_commit(store):
    col = store.create_or_open("docs", make_spec())
    col.add(make_chunks(4), make_vectors(4))
    assert col.add(make_chunks(4), make_vectors(4)) == (0, 4, 0)
    assert store.version("docs") == 1                      # nothing changed, nothing committed
    twice = make_chunks(2, doc_id="x") + [Chunk(id="y#0", doc_id="y", text="passage x number 0", num_tokens=5)]
    assert col.add(twice, make_vectors(3, seed=3)) == (2, 1, 0)
    assert len(store.open("docs")) == 6
    assert len(col.new_chunks(make_chunks(3, doc_id="x") + make_chunks(1, doc_id="z"))) == 2


def test_remove_ids_replace_chunks_in_one_batch(store):
    col = store.create_or_open("docs", make_spec())
    col.add(make_chunks(5), make_vectors(5))
    edited = [Chunk(id="doc#0", doc_id="doc", text="an edited passage", num_tokens=3)]
    assert col.add(edited, make_vectors(1, seed=4), remove_ids=[f"doc#{i}" for i in range(5)]) == (1, 0, 5)
    fresh = store.open("docs")
    assert len(fresh) == 1 and fresh.chunk("doc#0").text == "an edited passage"
    assert [c.id for c in fresh.iter_chunks()] == ["doc#0"]
    assert fresh.chunk_hashes(["doc"]).keys() == {"doc#0"} and fresh.chunk_hashes(["other"]) == {}
    with pytest.raises(BadInput, match="already stored"):
        col.add([Chunk(id="doc#0", doc_id="doc", text="other text", num_tokens=2)], make_vectors(1, seed=5))


def test_filters_match_the_faiss_semantics(store):
    col = store.create_or_open("meetings", make_spec())
    chunks = [Chunk(id=f"c{i}", doc_id=f"c{i}", text=f"turns {i}", num_tokens=2, title=f"t{i % 2}",
                    metadata={"doc_id": "test-Bed003" if i % 3 == 0 else "test-Other", "n": i, "q": 'a"b'})
              for i in range(12)]
    vectors = make_vectors(12)
    col.add(chunks, vectors)
    col = store.open("meetings")
    hits = col.search(vectors[1], k=3, filters={"doc_id": "test-Bed003"})     # metadata wins over the field
    rows = [i for i in range(12) if i % 3 == 0]
    best = sorted(rows, key=lambda i: -float(vectors[i] @ vectors[1]))[:3]
    assert [h.chunk.id for h in hits] == [f"c{i}" for i in best]
    assert {h.chunk.id for h in col.search(vectors[0], k=12, filters={"n": [1, 2, 99]})} == {"c1", "c2"}
    assert len(col.search(vectors[0], k=12, filters={"title": "t1", "q": 'a"b'})) == 6   # chunk-field fallback
    assert col.search(vectors[0], k=5, filters={"n": 999}) == []
    with pytest.raises(BadInput, match="filter values"):
        col.search(vectors[0], k=1, filters={"n": {"$gt": 1}})
    with pytest.raises(BadInput, match="k=13"):
        col.search(vectors[0], k=13)


def test_delete_and_unknown(store):
    col = store.create_or_open("docs", make_spec())
    col.add(make_chunks(2), make_vectors(2))
    with pytest.raises(NotFound, match="existing: docs"):
        store.open("nope")
    store.delete("docs")
    assert store.list_collections() == [] and store.version("docs") is None
    with pytest.raises(NotFound):
        store.delete("docs")
    col = store.create_or_open("docs", make_spec())                    # the name is free again
    assert col.add(make_chunks(1), make_vectors(1)) == (1, 0, 0) and len(store.open("docs")) == 1


def test_other_spec_is_refused(store):
    store.create_or_open("docs", make_spec()).add(make_chunks(1), make_vectors(1))
    with pytest.raises(BadInput, match="dim: stored 8 vs 4"):
        store.create_or_open("docs", make_spec(dim=4))


def test_config_selects_and_validates_the_store(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("retrieval:\n  store: milvus\n  milvus: {uri: /tmp/x/milvus.db, index_type: FLAT}\n")
    loaded = Config.load(cfg).retrieval
    assert loaded.store == "milvus" and loaded.milvus.uri == "/tmp/x/milvus.db"
    with pytest.raises(ConfigError, match="retrieval.store='chroma'"):
        RetrievalConfig(store="chroma")
    for body, match in [("milvus: {uri: 'milvus:19530'}", "retrieval.milvus.uri"),
                        ("milvus: {url: x}", "retrieval.milvus.url")]:
        cfg.write_text(f"retrieval:\n  store: milvus\n  {body}\n")
        with pytest.raises(ConfigError, match=match):
            Config.load(cfg)


# ---------------------------------------------------------------------------- Milvus crash safety

def _milvus_docs(n: int = 5) -> None:
    col = open_store(config_of("milvus")).create_or_open("docs", make_spec())
    col.add(make_chunks(n), make_vectors(n))
    _close_milvus()   # Milvus Lite: one process per file; the child opens it next


CRASH = """
    import os, signal
    from ragserve.config import RetrievalConfig
    from ragserve.domain import Chunk
    from ragserve.retrieval import milvus_collection
    from ragserve.retrieval.base import open_store
    from retrieval_factories import make_chunks, make_vectors
    col = open_store(RetrievalConfig(store="milvus")).open("docs")
    def crash(stage):
        if stage == {stage!r}:
            os.kill(os.getpid(), signal.SIGKILL)
    milvus_collection._hook = crash
    edited = [Chunk(id="doc#0", doc_id="doc", text="edited", num_tokens=1)]
    col.add(make_chunks(3, doc_id="new") + edited, make_vectors(4, seed=7), remove_ids=["doc#0", "doc#1"])
    print("not killed")
"""


@pytest.mark.parametrize("stage", ["rows_written", "committed"])
def test_milvus_sigkill_mid_batch_shows_all_or_nothing(data_dir: Path, stage: str):
    _milvus_docs(5)
    out = run_python(CRASH.replace("{stage!r}", repr(stage)), data_dir)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    store = open_store(config_of("milvus"))
    col = store.open("docs")
    ids = sorted(c.id for c in col.iter_chunks())
    if stage == "committed":
        assert ids == ["doc#0", "doc#2", "doc#3", "doc#4", "new#0", "new#1", "new#2"] and len(col) == 7
        assert col.chunk("doc#0").text == "edited"
    else:                                                   # not published: the old state, whole
        assert ids == [f"doc#{i}" for i in range(5)] and len(col) == 5
        assert col.chunk("doc#0").text == "passage doc number 0"
    assert len(col.search(make_vectors(5)[0], k=len(col))) == len(col)
    # The next batch undoes the crashed one's rows and commits normally.
    col.add(make_chunks(1, doc_id="after"), make_vectors(1, seed=9))
    again = store.open("docs")
    assert len(again) == len(col) and len(list(again.iter_chunks())) == len(col)
    assert sorted(c.id for c in again.iter_chunks()) == sorted(ids + ["after#0"])


INGEST_LOOP = """
    import sys
    from ragserve.config import RetrievalConfig
    from ragserve.retrieval.base import open_store
    from retrieval_factories import make_chunks, make_spec, make_vectors
    store = open_store(RetrievalConfig(store="milvus"))
    col = store.create_or_open("docs", make_spec())
    for b in range(1000):
        col.add(make_chunks(50, doc_id=f"b{b}"), make_vectors(50, seed=b))
        print("ACK", b, flush=True)
"""


def test_milvus_kill_9_mid_ingest_keeps_every_acknowledged_batch(data_dir: Path):
    env = {**os.environ, "RAGSERVE_DATA": str(data_dir), "PYTHONPATH": str(REPO)}
    code = "import sys; sys.path.insert(0, 'tests/retrieval')\n" + textwrap.dedent(INGEST_LOOP)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acked = []
    try:
        deadline = time.monotonic() + 90
        while len(acked) < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line.split()[1]))
        time.sleep(0.05)            # land somewhere inside the next batch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(acked) == 4, proc.stderr.read()
    col = open_store(config_of("milvus")).open("docs")
    per_doc: dict[str, int] = {}
    for c in col.iter_chunks():
        per_doc[c.doc_id] = per_doc.get(c.doc_id, 0) + 1
    assert {f"b{b}" for b in acked} <= per_doc.keys()       # every acknowledged batch is searchable
    assert set(per_doc.values()) == {50} and len(col) == 50 * len(per_doc)   # and no half batch
    hits = col.search(make_vectors(50, seed=acked[-1])[7], k=1)
    assert hits[0].chunk.id == f"b{acked[-1]}#7"


# ---------------------------------------------------------------------------- dataset filters

def test_qmsum_meeting_filter_is_the_same_on_both_stores(tokenizer, embedder):
    """qmsum queries retrieve only inside their meeting (`query_filters`): the two stores return
    the same chunks for real passages and real questions."""
    from ragserve.eval.datasets import get_spec, load_corpus, load_questions, query_filters
    from ragserve.retrieval.chunking import Document
    from ragserve.retrieval.ingest import ingest_documents

    spec = get_spec("qmsum")
    questions = load_questions("qmsum")[:2]
    meetings = {q["doc_id"] for q in questions}
    corpus = load_corpus("qmsum")
    passages = [p for m in sorted(meetings) for p in [p for p in corpus if p.get("doc_id") == m][:6]]
    passages += [p for p in corpus if p.get("doc_id") not in meetings][:6]
    docs = [Document(id=p["id"], title=str(p.get("title") or ""), text=p["text"],
                     metadata={k: v for k, v in p.items() if k not in ("id", "title", "text")}) for p in passages]
    results = {}
    for kind in ("faiss", "milvus"):
        cfg = RetrievalConfig(store=kind, chunk_tokens=128)
        report = ingest_documents(docs, "qmsum", tokenizer, embedder, cfg)
        col = open_store(cfg).open("qmsum")
        assert len(col) == report.num_chunks_total and col.num_documents == len(docs)
        out = []
        for q in questions:
            filters = query_filters(spec, q)
            assert filters == {"doc_id": q["doc_id"]}
            hits = col.search(embedder.encode_query(q["question"]), k=5, filters=filters)
            assert hits and all(h.chunk.metadata["doc_id"] == q["doc_id"] for h in hits)
            out.append([(h.chunk.id, round(h.score, 4)) for h in hits])
        results[kind] = out
        assert ingest_documents(docs, "qmsum", tokenizer, embedder, cfg).added == 0   # idempotent
    _close_milvus()
    assert results["faiss"] == results["milvus"]
