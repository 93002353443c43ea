"""Collection store: persistence, dedupe, search and filters, crash safety, bad input.

Vectors are random unit vectors of dim 8: these tests need neither torch nor a model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from retrieval_factories import make_chunks, make_spec, make_vectors

from ragserve.domain import Chunk
from ragserve.errors import BadInput, CollectionDamaged, NotFound
from ragserve.retrieval.store import Collection, list_collections

REPO = Path(__file__).resolve().parents[2]


def make_collection(name: str = "docs", n: int = 6) -> Collection:
    col = Collection.create_or_open(name, make_spec())
    col.add(make_chunks(n), make_vectors(n))
    return col


def run_python(code: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGSERVE_DATA": str(data_dir)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_new_collection_is_written_by_its_first_add(data_dir: Path):
    col = Collection.create_or_open("docs", make_spec())
    assert len(col) == 0 and list_collections() == [] and not (data_dir / "collections/docs").exists()
    assert col.add(make_chunks(3), make_vectors(3)) == (3, 0, 0)
    assert list_collections() == ["docs"]
    manifest = json.loads(next((data_dir / "collections/docs").glob("gen-*/manifest.json")).read_text())
    assert manifest["num_chunks"] == 3 and manifest["tokenizer"] == "test-tokenizer" and manifest["version"] == 1


def test_search_returns_nearest_by_cosine():
    col = make_collection(n=6)
    vectors = make_vectors(6)
    hits = col.search(vectors[2] * 3.0, k=3)            # scale must not matter: cosine
    assert hits[0].chunk.id == "doc#2" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    expected = np.sort(vectors @ vectors[2])[::-1][:3]
    assert np.allclose([h.score for h in hits], expected, atol=1e-5)


def test_add_dedupes_by_text():
    col = make_collection(n=4)
    gen = col.generation
    assert col.add(make_chunks(4), make_vectors(4)) == (0, 4, 0)
    assert col.generation == gen                        # nothing changed, nothing written
    # Same text under another document id (a copied file) is still a duplicate.
    copies = [Chunk(id=f"copy#{i}", doc_id="copy", text=c.text, num_tokens=5) for i, c in enumerate(make_chunks(4))]
    assert col.add(copies, make_vectors(4, seed=1)) == (0, 4, 0)
    # Duplicates inside one batch are stored once.
    twice = make_chunks(1, doc_id="new") * 2
    assert col.add(twice, make_vectors(2, seed=2)) == (1, 1, 0)
    assert len(col) == 5


def test_remove_ids_replaces_chunks_in_one_commit():
    col = make_collection(n=4)
    edited = [Chunk(id="doc#3", doc_id="doc", text="rewritten passage", num_tokens=2)]
    with pytest.raises(BadInput, match="doc#3"):        # same id, other text, old one not removed
        col.add(edited, make_vectors(1, seed=3))
    assert col.add(edited, make_vectors(1, seed=3), remove_ids=["doc#3"]) == (1, 0, 1)
    assert len(col) == 4 and col.chunk("doc#3").text == "rewritten passage"


def test_persists_across_processes(data_dir: Path):
    col = make_collection(n=5)
    query = make_vectors(5)[4].tolist()
    out = run_python(f"""
        from ragserve.retrieval.store import Collection
        col = Collection.open("docs")
        hits = col.search({query}, k=2)
        print(len(col), hits[0].chunk.id, round(hits[0].score, 4), col.chunk("doc#1").text)
        """, data_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "doc#4", "1.0", *col.chunk("doc#1").text.split()]


@pytest.mark.parametrize("stage", ["files_written", "generation_renamed", "pointer_written", "switched"])
def test_sigkill_mid_commit_leaves_a_loadable_collection(data_dir: Path, stage: str):
    make_collection(n=5)
    out = run_python(f"""
        import os, signal
        from ragserve.retrieval import generations
        from ragserve.retrieval.store import Collection
        from retrieval_factories import make_chunks, make_vectors
        col = Collection.open("docs")
        def crash(stage):
            if stage == {stage!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        generations._commit_hook = crash
        col.add(make_chunks(3, start=100), make_vectors(3, seed=7))
        print("not killed")
        """.replace("from retrieval_factories", "import sys; sys.path.insert(0, 'tests/retrieval'); from retrieval_factories"),
        data_dir)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    col = Collection.open("docs")
    expected = 8 if stage == "switched" else 5          # before the switch: the old state
    assert len(col) == expected
    assert col.search(make_vectors(5)[0], k=1)[0].chunk.id == "doc#0"
    # The next commit succeeds and clears the crashed commit's leftovers.
    col.add(make_chunks(1, doc_id="after"), make_vectors(1, seed=9))
    assert len(Collection.open("docs")) == expected + 1
    entries = sorted(p.name for p in (data_dir / "collections/docs").iterdir())
    # the new generation and the one it replaced (kept for rollback)
    assert entries == [".lock", "CURRENT", f"gen-{col.generation - 1:06d}", f"gen-{col.generation:06d}"]


def test_filters_return_top_k_among_matching_only():
    col = Collection.create_or_open("meetings", make_spec())
    chunks = [Chunk(id=f"c{i}", doc_id=f"c{i}", text=f"turns {i}", num_tokens=2,
                    metadata={"doc_id": "test-Bed003" if i % 3 == 0 else "test-Other", "n": i})
              for i in range(30)]
    vectors = make_vectors(30, seed=4)
    col.add(chunks, vectors)
    query = make_vectors(1, seed=5)[0]
    hits = col.search(query, k=4, filters={"doc_id": "test-Bed003"})
    matching = [i for i in range(30) if i % 3 == 0]
    best = sorted(matching, key=lambda i: -float(vectors[i] @ query))[:4]
    assert [h.chunk.id for h in hits] == [f"c{i}" for i in best]
    assert all(h.chunk.metadata["doc_id"] == "test-Bed003" for h in hits)
    # Fewer matches than k: all of them. Lists mean "any of". Unknown values match nothing.
    assert [h.chunk.id for h in col.search(query, k=5, filters={"n": 7})] == ["c7"]
    assert {h.chunk.id for h in col.search(query, k=10, filters={"n": [1, 2]})} == {"c1", "c2"}
    assert col.search(query, k=3, filters={"doc_id": "test-Nope"}) == []


def test_doc_id_filter_falls_back_to_the_chunk_field():
    col = make_collection(n=3)
    col.add(make_chunks(2, doc_id="other"), make_vectors(2, seed=6))
    hits = col.search(make_vectors(1, seed=8)[0], k=5, filters={"doc_id": "other"})
    assert sorted(h.chunk.id for h in hits) == ["other#0", "other#1"]


def test_get_chunks_and_unknown_chunk():
    col = make_collection(n=3)
    assert [c.id for c in col.get_chunks(["doc#2", "doc#0"])] == ["doc#2", "doc#0"]
    with pytest.raises(NotFound, match="doc#9"):
        col.chunk("doc#9")


def test_delete_and_list():
    make_collection("a")
    make_collection("b")
    assert list_collections() == ["a", "b"]
    Collection.delete("a")
    assert list_collections() == ["b"]
    with pytest.raises(NotFound, match="'a'"):
        Collection.delete("a")


# ---- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "has space", "x" * 65, "é"])
def test_bad_collection_name(name: str):
    with pytest.raises(BadInput, match="bad collection name"):
        Collection.create_or_open(name, make_spec())
    with pytest.raises(BadInput, match="bad collection name"):
        Collection.open(name)


def test_unknown_collection_lists_existing():
    make_collection("squad")
    with pytest.raises(NotFound, match=r"'qmsum' does not exist \(existing: squad\)"):
        Collection.open("qmsum")


@pytest.mark.parametrize("k", [0, 7, 100])
def test_k_out_of_range_names_k_and_size(k: int):
    col = make_collection(n=6)
    with pytest.raises(BadInput, match=f"k={k}.* 6 chunks"):
        col.search(make_vectors(1)[0], k=k)


def test_wrong_query_dim_and_bad_filters():
    col = make_collection(n=3)
    with pytest.raises(BadInput, match="dim 5"):
        col.search(np.ones(5), k=1)
    with pytest.raises(BadInput, match="filter"):
        col.search(make_vectors(1)[0], k=1, filters={"doc_id": {"nested": 1}})


def test_reopening_with_other_settings_is_refused():
    make_collection("docs")
    with pytest.raises(BadInput, match="chunk_tokens: stored 64 vs 128"):
        Collection.create_or_open("docs", make_spec().__class__(**{**make_spec().__dict__, "chunk_tokens": 128}))


def test_embeddings_must_match_chunks():
    col = Collection.create_or_open("docs", make_spec())
    with pytest.raises(BadInput, match=r"\(2, 8\)"):
        col.add(make_chunks(2), make_vectors(3))


def _current_dir(data_dir: Path, name: str = "docs") -> Path:
    root = data_dir / "collections" / name
    return root / (root / "CURRENT").read_text().strip()


@pytest.mark.parametrize("damage", ["truncate index.faiss", "cut-mid-line chunks.jsonl",
                                    "flip a byte of index.faiss", "remove index.faiss"])
def test_damaged_generation_is_detected_and_rolled_back(data_dir: Path, damage: str):
    make_collection(n=3)
    col = Collection.open("docs")
    col.add(make_chunks(2, doc_id="more"), make_vectors(2, seed=3))
    gen_dir = _current_dir(data_dir)
    action, fname = damage.split()[0], damage.split()[-1]
    target = gen_dir / fname
    data = target.read_bytes()
    if action == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif action == "cut-mid-line":
        target.write_bytes(data[: data.index(b"\n") + 10])
    elif action == "flip":
        target.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:
        target.unlink()
    with pytest.raises(CollectionDamaged, match=r"'docs' is damaged .*collections rollback docs"):
        Collection.open("docs")
    assert list_collections() == ["docs"]        # still listed, so it can be rolled back or deleted
    assert Collection.rollback("docs") == (col.generation, col.generation - 1)
    back = Collection.open("docs")
    assert len(back) == 3 and back.generation == col.generation - 1
    back.add(make_chunks(1, doc_id="after"), make_vectors(1, seed=4))   # commits go on from there
    assert len(Collection.open("docs")) == 4


def test_damaged_only_generation_says_delete_and_reingest(data_dir: Path):
    make_collection(n=3)
    (_current_dir(data_dir) / "chunks.jsonl").write_text("{not json\n")
    with pytest.raises(CollectionDamaged, match="delete it .* and re-ingest") as info:
        Collection.open("docs")
    assert "rollback" not in str(info.value)
    with pytest.raises(CollectionDamaged, match="no earlier generation"):
        Collection.rollback("docs")
    Collection.delete("docs")
    assert list_collections() == []


def test_cli_lists_damage_and_rolls_back(data_dir: Path):
    make_collection("good", n=2)
    make_collection("docs", n=3)
    Collection.open("docs").add(make_chunks(2, doc_id="more"), make_vectors(2, seed=3))
    (_current_dir(data_dir) / "index.faiss").write_bytes(b"torn")
    env = {**os.environ, "RAGSERVE_DATA": str(data_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ragserve.cli", "collections", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 1
    assert "docs\tdamaged\t" in listed.stdout and "good\tok\t2 chunks" in listed.stdout
    rolled = cli("rollback", "docs")
    assert rolled.returncode == 0, rolled.stderr
    assert "generation 1 is current again" in rolled.stdout
    assert cli("list").returncode == 0 and len(Collection.open("docs")) == 3
    missing = cli("rollback", "nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
