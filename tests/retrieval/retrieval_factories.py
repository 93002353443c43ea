"""Factories for retrieval tests (imported by module name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np

from ragserve.config import datasets_dir
from ragserve.domain import Chunk
from ragserve.retrieval.store import CollectionSpec


def squad_records(n: int, start: int = 0) -> list[dict]:
    """The first `n` passages (after `start`) of the shared SQuAD corpus, read at test time."""
    with open(datasets_dir() / "squad/corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, start, start + n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_spec(dim: int = 8) -> CollectionSpec:
    return CollectionSpec(embedding_model="test-embedder", dim=dim, tokenizer="test-tokenizer",
                          chunk_tokens=64, chunk_overlap_tokens=8)


def make_chunks(n: int, doc_id: str = "doc", start: int = 0, **metadata) -> list[Chunk]:
    return [Chunk(id=f"{doc_id}#{i}", doc_id=doc_id, text=f"passage {doc_id} number {i}",
                  num_tokens=5, metadata=dict(metadata))
            for i in range(start, start + n)]


def make_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
