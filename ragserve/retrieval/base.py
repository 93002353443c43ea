"""The vector-store interface every collection backend implements (FAISS files, Milvus).

Two roles:

    VectorStore          the backend: lists, opens, creates and deletes named collections,
                         and tells a reader whether a collection moved on (`version`).
    StoredCollection     one named collection: chunks + unit vectors + content hashes, searched
                         by cosine similarity with metadata filters; `add` commits a batch.

Contract shared by the backends (tests/retrieval/test_store_contract.py runs it on both):
  - `add` is atomic: a reader sees all of a batch (its new chunks and its removals) or none
    of it, also after a kill -9 at any point; it returns only once the batch is durable.
  - dedupe: a chunk whose content hash is already stored (or earlier in the batch) is skipped.
  - filters: {key: value or [values]} on chunk metadata, "doc_id"/"title" falling back to the
    chunk's own fields; the result is the exact top-k among the matching chunks.
  - a collection exists once its first batch committed; a failed first ingest leaves nothing.
`open_store(config)` picks the backend from `retrieval.store`; callers never name one.
"""
from __future__ import annotations

import abc
from typing import Any, Iterable, Iterator

import numpy as np

from ragserve.config import RetrievalConfig
from ragserve.domain import Chunk, RetrievedChunk
from ragserve.errors import RagServeError


class StoredCollection(abc.ABC):
    """One named collection. Reads are thread-safe; `add` is serialized per collection."""

    name: str
    spec: Any                  # store.CollectionSpec: what every chunk shares
    generation: int            # the committed batch this handle reads; 0 = never committed

    @abc.abstractmethod
    def __len__(self) -> int:
        """Chunks visible in the committed state."""

    @property
    @abc.abstractmethod
    def num_documents(self) -> int:
        """Distinct doc_ids among the visible chunks."""

    @abc.abstractmethod
    def chunk(self, chunk_id: str) -> Chunk:
        """The stored chunk; raises NotFound."""

    def get_chunks(self, ids: Iterable[str]) -> list[Chunk]:
        return [self.chunk(i) for i in ids]

    @abc.abstractmethod
    def iter_chunks(self) -> Iterator[Chunk]:
        """Every visible chunk (one committed state)."""

    @abc.abstractmethod
    def chunk_hashes(self, doc_ids: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
        """Stored chunk id -> (doc_id, content hash), of `doc_ids` only when given: lets ingest
        spot edited documents without reading the whole collection."""

    @abc.abstractmethod
    def new_chunks(self, chunks: Iterable[Chunk], remove_ids: Iterable[str] = ()) -> list[Chunk]:
        """The chunks `add` would store: text not stored (after removing `remove_ids`), first copy only."""

    @abc.abstractmethod
    def search(self, query_embedding: np.ndarray, k: int,
               filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
        """Top-`k` by cosine similarity, best first; BadInput when k is not in 1..len(self)."""

    @abc.abstractmethod
    def add(self, chunks: list[Chunk], embeddings: np.ndarray, remove_ids: Iterable[str] = ()) -> Any:
        """Commit one batch: store `chunks` (row i of `embeddings` is chunk i), drop `remove_ids`.
        Returns store.AddResult; commits nothing when nothing changes."""


class VectorStore(abc.ABC):
    """A backend holding named collections."""

    kind: str                   # "faiss" | "milvus": the value of retrieval.store

    @abc.abstractmethod
    def list_collections(self) -> list[str]:
        """Names of the committed collections, sorted."""

    @abc.abstractmethod
    def open(self, name: str) -> StoredCollection:
        """The committed collection; raises NotFound naming the existing ones."""

    def collection_sizes(self) -> dict[str, int]:
        """Chunks per collection; one that does not open is left out (the listing marks it)."""
        out = {}
        for name in self.list_collections():
            try:
                out[name] = len(self.open(name))
            except RagServeError:
                continue
        return out

    @abc.abstractmethod
    def create_or_open(self, name: str, spec: Any) -> StoredCollection:
        """Open `name`, or a new one written by its first `add`; BadInput when the stored
        collection was built with another spec."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove the collection; raises NotFound."""

    @abc.abstractmethod
    def version(self, name: str) -> int | None:
        """The committed generation readers would load now; None when `name` does not exist.
        Cheap: called before each retrieval to reload a handle another process changed."""


def open_store(config: RetrievalConfig | None = None) -> VectorStore:
    """The store `config.retrieval.store` names (a Milvus client is shared per URI)."""
    config = config or RetrievalConfig()
    if config.store == "milvus":
        from ragserve.retrieval.milvus_store import MilvusStore

        return MilvusStore.shared(config.milvus)
    from ragserve.retrieval.faiss_store import FaissStore

    return FaissStore()
