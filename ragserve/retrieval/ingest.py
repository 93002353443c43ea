"""Ingest (path or documents -> collection) and retrieval (question -> chunks).

Ingest: load documents -> chunk in the serving model's tokens -> drop what the collection
already holds (by content hash) -> embed only the rest -> one atomic commit. Nothing is
written before that commit, so a failure anywhere leaves the stored collection as it was.
A re-ingested document whose text changed has its stale chunks replaced in the same commit.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ragserve.config import RetrievalConfig
from ragserve.domain import RetrievedChunk
from ragserve.errors import BadInput
from ragserve.retrieval.chunking import Chunker, Document, load_documents
from ragserve.retrieval.base import StoredCollection, VectorStore, open_store
from ragserve.retrieval.embeddings import Embedder
from ragserve.retrieval.store import CollectionSpec, content_hash, validate_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestReport:
    added: int              # chunks embedded and stored
    skipped: int            # chunks whose text the collection already held
    num_documents: int      # documents read from the input
    num_chunks_total: int   # chunks in the collection after ingest
    elapsed_s: float
    removed: int = 0        # stale chunks of edited documents that were replaced
    collection: str = ""
    document_ids: tuple[str, ...] = ()   # the input documents, in input order
    chunk_ids: tuple[str, ...] = ()      # their chunks now stored (a chunk whose text another
                                         # stored chunk already holds is not stored twice)


def ingest(path: str | Path, collection_name: str, tokenizer: Any, embedder: Embedder,
           config: RetrievalConfig | None = None, progress: bool = True) -> IngestReport:
    """Add the documents at `path` to `collection_name`, creating it if needed.

    `tokenizer` is the serving model's (Hugging Face) tokenizer: chunk sizes and
    `Chunk.num_tokens` are in its tokens. Raises BadInput for bad input or a collection
    built with other settings; the stored collection is then untouched.
    """
    validate_name(collection_name)
    return ingest_documents(load_documents(path), collection_name, tokenizer, embedder, config,
                            progress=progress, source=str(path))


def ingest_documents(docs: Sequence[Document], collection_name: str, tokenizer: Any, embedder: Embedder,
                     config: RetrievalConfig | None = None, progress: bool = False,
                     source: str = "documents", store: VectorStore | None = None) -> IngestReport:
    """Add `docs` to `collection_name` (see `ingest`); returns only after the atomic commit.

    Document ids must be unique within `docs`; documents with only whitespace are dropped.
    `source` names the input in logs. The collection lives in `store`, default: the one
    `config.store` names.
    """
    t0 = time.perf_counter()
    config = config or RetrievalConfig()
    validate_name(collection_name)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise BadInput(f"no documents with text in {source}; give at least one non-empty document")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BadInput(f"document id {dup!r} appears more than once in {source}; ids must be unique")
    chunker = Chunker(tokenizer, config.chunk_tokens, config.chunk_overlap_tokens)
    chunks = chunker.split_documents(docs)
    spec = CollectionSpec(embedding_model=embedder.model_id, dim=embedder.dim, tokenizer=chunker.tokenizer_id,
                          chunk_tokens=config.chunk_tokens, chunk_overlap_tokens=config.chunk_overlap_tokens)
    col = (store or open_store(config)).create_or_open(collection_name, spec)

    # A stored chunk of an input document that the new chunking no longer produces
    # (same id and text) is stale: the document was edited since the last ingest.
    input_docs = set(ids)
    new_pairs = {(c.id, content_hash(c.text)) for c in chunks}
    stale = [cid for cid, (doc_id, h) in col.chunk_hashes(input_docs).items()
             if (cid, h) not in new_pairs]
    todo = col.new_chunks(chunks, remove_ids=stale)
    logger.info("ingest %s -> %s: %d documents, %d chunks, %d new, %d stale",
                source, collection_name, len(docs), len(chunks), len(todo), len(stale))

    vectors = embedder.encode([c.text for c in todo], batch_size=config.embed_batch_size, progress=progress)
    result = col.add(todo, vectors, remove_ids=stale)
    elapsed_s = time.perf_counter() - t0
    logger.info("ingested into %s: +%d chunks (%d skipped, %d replaced) in %.1fs, %d chunks total",
                collection_name, result.added, len(chunks) - result.added, result.removed, elapsed_s, len(col))
    stored = col.chunk_hashes(input_docs)
    return IngestReport(added=result.added, skipped=len(chunks) - result.added,
                        num_documents=len(docs), num_chunks_total=len(col), elapsed_s=elapsed_s,
                        removed=result.removed, collection=collection_name, document_ids=tuple(ids),
                        chunk_ids=tuple(c.id for c in chunks if c.id in stored))


class Retriever:
    """Embeds questions and searches collections; reopens a collection another process changed.

    `store` holds the collections (default: the FAISS store)."""

    def __init__(self, embedder: Embedder, store: VectorStore | None = None) -> None:
        self.embedder = embedder
        self.store = store or open_store()
        self._open: dict[str, StoredCollection] = {}

    def collection(self, name: str) -> StoredCollection:
        """The named collection, reloaded when its committed generation moved on."""
        col = self._open.get(name)
        if col is None or self.store.version(name) != col.generation:
            col = self._open[name] = self.store.open(name)
        return col

    def forget(self, name: str) -> None:
        """Drop the open handle of a deleted collection (its index and docstore memory)."""
        self._open.pop(name, None)

    def retrieve(self, collection: StoredCollection | str, question: str, k: int,
                 filters: dict[str, Any] | None = None) -> tuple[list[RetrievedChunk], float]:
        """Top-`k` chunks for `question`, best first, and the time it took in seconds."""
        t0 = time.perf_counter()
        if not isinstance(question, str) or not question.strip():
            raise BadInput(f"question {question!r} is empty; ask a question with some text")
        col = self.collection(collection) if isinstance(collection, str) else collection
        if col.spec.embedding_model != self.embedder.model_id:
            raise BadInput(f"collection {col.name!r} was embedded with {col.spec.embedding_model!r}, "
                           f"this retriever uses {self.embedder.model_id!r}; use a matching embedder")
        hits = col.search(self.embedder.encode_query(question), k, filters)
        return hits, time.perf_counter() - t0
