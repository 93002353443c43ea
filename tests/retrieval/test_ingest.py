"""End to end with the real MiniLM tokenizer and embedder: ingest, dedupe, retrieve, failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from retrieval_factories import squad_records, write_jsonl

from ragserve.config import RetrievalConfig, datasets_dir
from ragserve.errors import BadInput, NotFound
from ragserve.retrieval.ingest import Retriever, ingest
from ragserve.retrieval.store import Collection, list_collections

REPO = Path(__file__).resolve().parents[2]
SMALL = RetrievalConfig(chunk_tokens=32, chunk_overlap_tokens=4, embed_batch_size=16)

NOTES = {
    "cats.txt": "Cats purr when they are content. A purring cat vibrates its larynx.\n\n"
                "Cats sleep for most of the day and hunt at dusk. Kittens open their eyes "
                "after about a week, and most house cats live for twelve to eighteen years.",
    "volcanoes.md": "# Volcanoes\n\nA volcano erupts when magma rises through the crust. "
                    "Lava flows can bury whole towns.",
    "sub/trains.txt": "The first public steam railway opened in 1825 between Stockton and Darlington.",
}


def write_notes(root: Path, notes: dict[str, str] = NOTES) -> Path:
    for name, text in notes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def all_chunks(col: Collection):
    return [h.chunk for h in col.search(np.ones(col.spec.dim), k=len(col))]


def state_on_disk(data_dir: Path, name: str) -> tuple:
    root = data_dir / "collections" / name
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    return (root / "CURRENT").read_text(), files, len(Collection.open(name))


def test_ingest_folder_and_retrieve(tmp_path: Path, tokenizer, embedder):
    folder = write_notes(tmp_path / "notes")
    report = ingest(folder, "notes", tokenizer, embedder, SMALL, progress=False)
    assert report.num_documents == 3 and report.skipped == 0
    assert report.added == report.num_chunks_total > 3         # cats.txt needs several 32-token chunks
    col = Collection.open("notes")
    assert all(c.num_tokens <= 32 for c in all_chunks(col))
    hits, retrieve_s = Retriever(embedder).retrieve("notes", "Why does a cat purr?", k=2)
    assert Path(hits[0].chunk.doc_id).name == "cats.txt" and retrieve_s > 0
    assert -1.0 <= hits[1].score <= hits[0].score <= 1.0


def test_second_ingest_adds_nothing_even_from_another_path(tmp_path: Path, tokenizer, embedder):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", squad_records(8))
    first = ingest(corpus, "squad", tokenizer, embedder, progress=False)
    assert first.num_documents == 8 and first.added == first.num_chunks_total >= 8
    gen = Collection.open("squad").generation
    second = ingest(corpus, "squad", tokenizer, embedder, progress=False)
    assert (second.added, second.skipped, second.num_chunks_total) == (0, first.added, first.added)
    # The same passage as a text file elsewhere: same text, nothing new.
    copy = tmp_path / "elsewhere" / "copy.txt"
    copy.parent.mkdir()
    copy.write_text(squad_records(1)[0]["text"], encoding="utf-8")
    third = ingest(copy, "squad", tokenizer, embedder, progress=False)
    assert (third.added, third.skipped) == (0, 1)
    assert Collection.open("squad").generation == gen


def test_edited_document_replaces_its_stale_chunks(tmp_path: Path, tokenizer, embedder):
    folder = write_notes(tmp_path / "notes")
    ingest(folder, "notes", tokenizer, embedder, SMALL, progress=False)
    (folder / "sub/trains.txt").write_text("Trains now run on electricity.", encoding="utf-8")
    report = ingest(folder, "notes", tokenizer, embedder, SMALL, progress=False)
    assert (report.added, report.removed) == (1, 1)
    trains = str((folder / "sub/trains.txt").resolve())
    assert Collection.open("notes").chunk(f"{trains}#0").text == "Trains now run on electricity."


def test_metadata_filter_returns_only_the_matching_meeting(tmp_path: Path, tokenizer, embedder):
    with open(datasets_dir() / "qmsum/corpus.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for i, line in enumerate(f) if i in (0, 1, 52, 53)]
    assert {r["doc_id"] for r in records} == {"test-Bed003", "test-Bed008"}
    ingest(write_jsonl(tmp_path / "corpus.jsonl", records), "qmsum", tokenizer, embedder, progress=False)
    retriever = Retriever(embedder)
    hits, _ = retriever.retrieve("qmsum", "What did the group discuss?", k=3, filters={"doc_id": "test-Bed008"})
    assert len(hits) == 3
    assert all(h.chunk.metadata["doc_id"] == "test-Bed008" and h.chunk.doc_id.startswith("qmsum_test-Bed008")
               for h in hits)


def test_another_process_searches_the_ingested_collection(tmp_path: Path, data_dir: Path, tokenizer, embedder):
    ingest(write_notes(tmp_path / "notes"), "notes", tokenizer, embedder, SMALL, progress=False)
    query = embedder.encode_query("When did the first steam railway open?")
    np.save(tmp_path / "query.npy", query)
    expected = [h.chunk.id for h in Collection.open("notes").search(query, k=3)]
    code = f"""
        import numpy as np
        from ragserve.retrieval.store import Collection
        hits = Collection.open("notes").search(np.load({str(tmp_path / "query.npy")!r}), k=3)
        print("\\n".join(h.chunk.id for h in hits))
        """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "RAGSERVE_DATA": str(data_dir)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == expected and expected[0].startswith(str(tmp_path / "notes/sub/trains.txt"))


class FailingEmbedder:
    """Passes the settings checks, then fails while embedding."""

    def __init__(self, real) -> None:
        self.model_id, self.dim = real.model_id, real.dim

    def encode(self, texts, **kwargs):
        raise RuntimeError("embedding crashed")


def test_failed_ingest_leaves_the_stored_collection_untouched(tmp_path: Path, data_dir: Path, tokenizer, embedder):
    ingest(write_notes(tmp_path / "notes"), "notes", tokenizer, embedder, SMALL, progress=False)
    before = state_on_disk(data_dir, "notes")
    more = write_notes(tmp_path / "more", {"owls.txt": "Owls hunt at night."})
    with pytest.raises(RuntimeError, match="embedding crashed"):
        ingest(more, "notes", tokenizer, FailingEmbedder(embedder), SMALL, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b"\n', encoding="utf-8")
    with pytest.raises(BadInput, match="line 2"):
        ingest(bad, "notes", tokenizer, embedder, SMALL, progress=False)
    with pytest.raises(BadInput, match="chunk_tokens: stored 32 vs 256"):
        ingest(more, "notes", tokenizer, embedder, RetrievalConfig(), progress=False)
    assert state_on_disk(data_dir, "notes") == before
    # A failed first ingest leaves no collection behind.
    with pytest.raises(RuntimeError):
        ingest(more, "fresh", tokenizer, FailingEmbedder(embedder), SMALL, progress=False)
    assert list_collections() == ["notes"]


def test_bad_inputs_name_the_value(tmp_path: Path, tokenizer, embedder):
    ingest(write_notes(tmp_path / "notes"), "notes", tokenizer, embedder, SMALL, progress=False)
    retriever = Retriever(embedder)
    for question in ["", "   \n"]:
        with pytest.raises(BadInput, match="question .* is empty"):
            retriever.retrieve("notes", question, k=1)
    size = len(Collection.open("notes"))
    with pytest.raises(BadInput, match=f"k=50 .* {size} chunks"):
        retriever.retrieve("notes", "cats", k=50)
    with pytest.raises(NotFound, match="'nope' does not exist"):
        retriever.retrieve("nope", "cats", k=1)
    with pytest.raises(BadInput, match="'../up'"):
        ingest(tmp_path / "notes", "../up", tokenizer, embedder, SMALL, progress=False)
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    with pytest.raises(BadInput, match="latin1.txt"):
        ingest(tmp_path / "latin1.txt", "notes", tokenizer, embedder, SMALL, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="no documents"):
        ingest(empty, "notes", tokenizer, embedder, SMALL, progress=False)


def test_retriever_reloads_after_another_ingest(tmp_path: Path, tokenizer, embedder):
    ingest(write_notes(tmp_path / "notes"), "notes", tokenizer, embedder, SMALL, progress=False)
    retriever = Retriever(embedder)
    size = len(retriever.collection("notes"))
    ingest(write_notes(tmp_path / "more", {"owls.txt": "Owls hunt at night."}), "notes",
           tokenizer, embedder, SMALL, progress=False)
    hits, _ = retriever.retrieve("notes", "Which bird hunts at night?", k=size + 1)
    assert Path(hits[0].chunk.doc_id).name == "owls.txt"
