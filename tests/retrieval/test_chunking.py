"""Loading inputs and splitting them in tokenizer tokens (MiniLM tokenizer, no LLM)."""
from __future__ import annotations

from pathlib import Path

import pytest
from retrieval_factories import squad_records, write_jsonl

from ragserve.errors import BadInput
from ragserve.retrieval.chunking import Chunker, load_documents


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# ---- chunking ----------------------------------------------------------------------

def test_chunks_fit_the_token_limit_and_count_exactly(tokenizer):
    text = "\n\n".join(r["text"] for r in squad_records(6))
    chunks = Chunker(tokenizer, chunk_tokens=48, chunk_overlap_tokens=8).split(
        "doc-a", "Title", text, {"source": "squad"})
    assert len(chunks) > 6
    assert [c.id for c in chunks] == [f"doc-a#{i}" for i in range(len(chunks))]
    for c in chunks:
        assert c.num_tokens == count(tokenizer, c.text) <= 48
        assert (c.doc_id, c.title, c.metadata) == ("doc-a", "Title", {"source": "squad"})
    # Nothing is lost: every sentence of the input appears in some chunk.
    joined = " ".join(c.text for c in chunks)
    for sentence in squad_records(1)[0]["text"].split(". "):
        assert sentence.strip(". ") in joined


def test_a_document_that_fits_is_one_chunk(tokenizer):
    text = "  A short note about cats.\n"
    (chunk,) = Chunker(tokenizer, chunk_tokens=32, chunk_overlap_tokens=4).split("n", "", text)
    assert chunk.text == "A short note about cats."
    assert chunk.num_tokens == count(tokenizer, chunk.text)


def test_unbreakable_text_is_cut_at_token_boundaries(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=16, chunk_overlap_tokens=0)
    text = "x".join(str(i) for i in range(400))  # no separators at all
    chunks = chunker.split("d", "", text)
    assert all(c.num_tokens <= 16 for c in chunks)
    assert all(n <= 16 for n in chunker.count_tokens(chunker._cut_by_tokens(text)))


def test_whitespace_only_text_gives_no_chunks(tokenizer):
    assert Chunker(tokenizer, chunk_tokens=16, chunk_overlap_tokens=0).split("d", "", " \n\n ") == []


@pytest.mark.parametrize("size,overlap", [(0, 0), (16, 16), (16, -1)])
def test_bad_chunk_settings_name_the_values(tokenizer, size, overlap):
    with pytest.raises(BadInput, match=str(size)):
        Chunker(tokenizer, chunk_tokens=size, chunk_overlap_tokens=overlap)


# ---- loading -----------------------------------------------------------------------

def test_load_txt_file(tmp_path: Path):
    f = tmp_path / "note.txt"
    f.write_text("Cats purr.", encoding="utf-8")
    (doc,) = load_documents(f)
    assert (doc.id, doc.title, doc.text) == (str(f.resolve()), "note", "Cats purr.")


def test_load_folder_is_recursive_sorted_and_skips_other_files(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("# B", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "a.txt").write_text("top A", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden" / "c.txt").write_text("hidden", encoding="utf-8")
    docs = load_documents(tmp_path)
    assert [Path(d.id).relative_to(tmp_path.resolve()).as_posix() for d in docs] == ["a.txt", "b.md", "sub/a.txt"]


def test_load_jsonl_keeps_extra_fields_as_metadata(tmp_path: Path):
    records = squad_records(3)
    records[1]["doc_id"] = "meeting-1"       # like qmsum: a record field named doc_id
    records[1]["turn_start"] = 4
    docs = load_documents(write_jsonl(tmp_path / "corpus.jsonl", records))
    assert [d.id for d in docs] == [r["id"] for r in records]
    assert docs[0].title == records[0]["title"] and docs[0].text == records[0]["text"]
    assert docs[1].metadata == {"doc_id": "meeting-1", "turn_start": 4}
    assert docs[0].metadata == {}


def test_chunk_doc_id_is_the_record_id_and_metadata_doc_id_survives(tmp_path: Path, tokenizer):
    record = {"id": "qmsum_x_c000", "title": "t", "text": "Speaker A: hello .", "doc_id": "test-X"}
    (doc,) = load_documents(write_jsonl(tmp_path / "corpus.jsonl", [record]))
    (chunk,) = Chunker(tokenizer).split_documents([doc])
    assert chunk.id == "qmsum_x_c000#0" and chunk.doc_id == "qmsum_x_c000"
    assert chunk.metadata["doc_id"] == "test-X"


# ---- bad input ---------------------------------------------------------------------

def test_missing_path(tmp_path: Path):
    with pytest.raises(BadInput, match="nope.txt"):
        load_documents(tmp_path / "nope.txt")


def test_non_utf8_file_is_named(tmp_path: Path):
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(BadInput, match="latin1.txt.*not UTF-8"):
        load_documents(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", '{"id": "a", "text": "   "}\n'])
def test_empty_corpus(tmp_path: Path, content: str):
    f = tmp_path / "corpus.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(BadInput, match="no documents.*corpus.jsonl"):
        load_documents(f)


def test_empty_folder(tmp_path: Path):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(BadInput, match=f"no documents.*{tmp_path.name}"):
        load_documents(tmp_path)


@pytest.mark.parametrize("bad_line,why", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "title": "no text"}', "lacks a string 'text'"),
    ('["a", "list"]', "lacks a string 'text'"),
    ('{"id": "squad_p0000", "text": "dup"}', "repeats id 'squad_p0000' of line 1"),
])
def test_bad_jsonl_line_names_the_line(tmp_path: Path, bad_line: str, why: str):
    f = write_jsonl(tmp_path / "corpus.jsonl", squad_records(2))
    with f.open("a", encoding="utf-8") as out:
        out.write("\n" + bad_line + "\n")           # a blank line 3, the bad one is line 4
    with pytest.raises(BadInput, match=f"corpus.jsonl' line 4 .*{why}"):
        load_documents(f)


def test_unsupported_file_type(tmp_path: Path):
    f = tmp_path / "report.pdf"
    f.write_bytes(b"%PDF")
    with pytest.raises(BadInput, match="report.pdf"):
        load_documents(f)
