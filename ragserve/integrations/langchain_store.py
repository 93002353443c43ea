"""LangChain vector stores, both directions (in process; needs langchain-core).

    RagServeVectorStore     a ragserve collection (FAISS or Milvus, whatever retrieval.store
                            says) as a LangChain `VectorStore`: similarity search with ragserve's
                            metadata filters, add_texts through ragserve's ingest (token chunking,
                            dedupe, one atomic commit), delete by document id, `as_retriever()`.
    LangChainStore          the other way: existing LangChain vector stores served as read-only
                            ragserve collections (`Retriever(embedder, LangChainStore({...}))`),
                            so the controller plans and answers over a store ragserve does not own.
    RagServeEmbeddings      ragserve's packaged MiniLM as LangChain `Embeddings`; a LangChain store
                            built with it is searched with the same query vectors ragserve uses.

    store = RagServeVectorStore("docs")                        # config: retrieval.store etc.
    docs = store.as_retriever(search_kwargs={"k": 4, "filter": {"doc_id": "a"}}).invoke("question")

Wrapping a foreign store is simpler than a ragserve backend for it: LangChain already speaks
to dozens of stores. Its limits: no ingest or delete through ragserve, and token counts of its
chunks are counted on read with the tokenizer given.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore as LCVectorStore

from ragserve.config import RetrievalConfig
from ragserve.domain import Chunk, RetrievedChunk
from ragserve.errors import BadInput, NotFound
from ragserve.retrieval.base import StoredCollection, VectorStore, open_store
from ragserve.retrieval.store import AddResult, CollectionSpec, content_hash, validate_name


class RagServeEmbeddings(Embeddings):
    """ragserve's `Embedder` (unit-length MiniLM vectors) behind LangChain's interface."""

    def __init__(self, embedder: Any = None) -> None:
        if embedder is None:
            from ragserve.retrieval.embeddings import Embedder

            embedder = Embedder()
        self.embedder = embedder
        self.model_id = embedder.model_id

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.encode(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.encode_query(text).tolist()


def to_document(hit: RetrievedChunk) -> LCDocument:
    c = hit.chunk
    return LCDocument(page_content=c.text, id=c.id,
                      metadata={**c.metadata, "chunk_id": c.id, "doc_id": c.metadata.get("doc_id", c.doc_id),
                                "source_doc_id": c.doc_id, "title": c.title, "score": hit.score})


class RagServeVectorStore(LCVectorStore):
    """One ragserve collection as a LangChain vector store (module docstring)."""

    def __init__(self, collection: str, *, config: RetrievalConfig | None = None, embedder: Any = None,
                 tokenizer: Any = None, model: str | None = None) -> None:
        """`config` picks the store (default: RetrievalConfig(), the FAISS files); `tokenizer`
        (or the serving `model`'s, loaded on first add) sizes chunks of added texts."""
        self.collection = validate_name(collection)
        self.config = config or RetrievalConfig()
        self.store = open_store(self.config)
        self._embeddings = RagServeEmbeddings(embedder)
        self._tokenizer, self._model = tokenizer, model

    @property
    def embeddings(self) -> Embeddings:
        return self._embeddings

    def _col(self) -> StoredCollection:
        return self.store.open(self.collection)

    # ---- search -------------------------------------------------------------------

    def similarity_search_with_score_by_vector(self, embedding: Sequence[float], k: int = 4,
                                               filter: dict[str, Any] | None = None,
                                               **kwargs: Any) -> list[tuple[LCDocument, float]]:
        col = self._col()
        hits = col.search(np.asarray(embedding, dtype=np.float32), min(k, len(col)), filter)
        return [(to_document(h), h.score) for h in hits]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                                     **kwargs: Any) -> list[tuple[LCDocument, float]]:
        return self.similarity_search_with_score_by_vector(self._embeddings.embed_query(query), k, filter)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4,
                                    filter: dict[str, Any] | None = None, **kwargs: Any) -> list[LCDocument]:
        return [d for d, _ in self.similarity_search_with_score_by_vector(embedding, k, filter)]

    def similarity_search(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                          **kwargs: Any) -> list[LCDocument]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda score: (score + 1.0) / 2.0     # cosine in [-1, 1] -> [0, 1]

    def get_by_ids(self, ids: Sequence[str], /) -> list[LCDocument]:
        col = self._col()
        out = []
        for i in ids:
            try:
                out.append(to_document(RetrievedChunk(col.chunk(i), 0.0)))
            except NotFound:
                continue
        return out

    # ---- writes -------------------------------------------------------------------

    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                  ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        """Ingest each text as one document (chunked in the serving model's tokens); returns the
        document ids (given, or a hash of the text). Re-adding a text stores nothing new."""
        from ragserve.retrieval.chunking import Document
        from ragserve.retrieval.ingest import ingest_documents

        texts = list(texts)
        metadatas = metadatas or [{} for _ in texts]
        doc_ids = list(ids) if ids else ["sha256:" + content_hash(t)[:24] for t in texts]
        if not len(texts) == len(metadatas) == len(doc_ids):
            raise BadInput(f"{len(texts)} texts, {len(metadatas)} metadatas and {len(doc_ids)} ids: give one each")
        docs = [Document(id=i, title=str(m.get("title", "")), text=t, metadata={k: v for k, v in m.items() if k != "title"})
                for i, t, m in zip(doc_ids, texts, metadatas)]
        ingest_documents(docs, self.collection, self._chunk_tokenizer(), self._embeddings.embedder,
                         self.config, store=self.store, source="LangChain add_texts")
        return doc_ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Remove the documents `ids` (every chunk of each) in one atomic commit."""
        if not ids:
            return None
        col = self._col()
        chunk_ids = list(col.chunk_hashes(ids))
        if chunk_ids:
            col.add([], np.zeros((0, col.spec.dim), dtype=np.float32), remove_ids=chunk_ids)
        return bool(chunk_ids)

    def _chunk_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from ragserve.config import default_model
            from ragserve.engines.local.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._model or default_model())
        return self._tokenizer

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict[str, Any]] | None = None,
                   *, ids: list[str] | None = None, collection: str = "langchain", **kwargs: Any
                   ) -> "RagServeVectorStore":
        embedder = getattr(embedding, "embedder", None)
        if embedder is None:
            raise BadInput("RagServeVectorStore embeds with ragserve's model: pass RagServeEmbeddings()")
        store = cls(collection, embedder=embedder, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


# ---------------------------------------------------------------------------- the other way

class LangChainCollection(StoredCollection):
    """A LangChain vector store as a read-only ragserve collection."""

    def __init__(self, name: str, lc_store: LCVectorStore, count_tokens: Callable[[str], int]) -> None:
        self.name = name
        self.lc_store = lc_store
        self.count_tokens = count_tokens
        self.generation = 1
        emb = lc_store.embeddings
        self.spec = CollectionSpec(embedding_model=getattr(emb, "model_id", type(emb).__name__ if emb else "unknown"),
                                   dim=0, tokenizer="", chunk_tokens=0, chunk_overlap_tokens=0)

    def _chunk(self, doc: LCDocument) -> Chunk:
        meta = dict(doc.metadata)
        doc_id = str(meta.get("doc_id") or doc.id or hashlib.sha256(doc.page_content.encode()).hexdigest()[:16])
        cid = str(doc.id or f"{doc_id}#{content_hash(doc.page_content)[:8]}")
        return Chunk(id=cid, doc_id=doc_id, text=doc.page_content, num_tokens=self.count_tokens(doc.page_content),
                     title=str(meta.get("title", "")), metadata=meta)

    def __len__(self) -> int:
        return 2**31            # unknown: a foreign store answers any k with what it has

    @property
    def num_documents(self) -> int:
        return 0

    def chunk(self, chunk_id: str) -> Chunk:
        docs = self.lc_store.get_by_ids([chunk_id])
        if not docs:
            raise NotFound(f"chunk {chunk_id!r} is not in collection {self.name!r}")
        return self._chunk(docs[0])

    def iter_chunks(self) -> Iterator[Chunk]:
        return iter(())          # LangChain has no portable scan

    def chunk_hashes(self, doc_ids: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
        return {}

    def new_chunks(self, chunks: Iterable[Chunk], remove_ids: Iterable[str] = ()) -> list[Chunk]:
        raise BadInput(f"collection {self.name!r} is a LangChain store: add documents through LangChain")

    def add(self, chunks: list[Chunk], embeddings: np.ndarray, remove_ids: Iterable[str] = ()) -> AddResult:
        raise BadInput(f"collection {self.name!r} is a LangChain store: add documents through LangChain")

    def search(self, query_embedding: np.ndarray, k: int,
               filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
        if not isinstance(k, int) or k < 1:
            raise BadInput(f"k={k!r} is out of range; ask for 1 or more chunks")
        q = np.asarray(query_embedding, dtype=np.float32).reshape(-1).tolist()
        kwargs = {"filter": filters} if filters else {}
        search = getattr(self.lc_store, "similarity_search_with_score_by_vector", None)
        if search is not None:
            pairs = search(q, k=k, **kwargs)
        else:   # scores are not part of LangChain's portable interface
            pairs = [(d, 0.0) for d in self.lc_store.similarity_search_by_vector(q, k=k, **kwargs)]
        return [RetrievedChunk(chunk=self._chunk(d), score=float(s)) for d, s in pairs]


class LangChainStore(VectorStore):
    """Named LangChain vector stores as read-only ragserve collections. Build them with
    `RagServeEmbeddings()` so ragserve's query vectors match theirs (the Retriever checks)."""

    kind = "langchain"

    def __init__(self, stores: dict[str, LCVectorStore], tokenizer: Any = None) -> None:
        """`tokenizer`: the serving model's (Chunk.num_tokens); None = about 4 characters a token."""
        self.stores = {validate_name(name): s for name, s in stores.items()}
        self.count_tokens: Callable[[str], int] = (
            (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer is not None
            else (lambda text: max(1, len(text) // 4)))

    def list_collections(self) -> list[str]:
        return sorted(self.stores)

    def open(self, name: str) -> LangChainCollection:
        if name not in self.stores:
            raise NotFound(f"collection {name!r} is not one of the LangChain stores ({', '.join(self.stores) or 'none'})")
        return LangChainCollection(name, self.stores[name], self.count_tokens)

    def create_or_open(self, name: str, spec: Any) -> LangChainCollection:
        raise BadInput(f"LangChain stores are read-only here: add documents to {name!r} through LangChain")

    def delete(self, name: str) -> None:
        raise BadInput(f"LangChain stores are read-only here: delete {name!r} through LangChain")

    def version(self, name: str) -> int | None:
        return 1 if name in self.stores else None
