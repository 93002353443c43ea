"""Retrieval: documents -> token-sized chunks -> embeddings -> persisted collections.

Modules, in data-flow order: `chunking` (load files/corpora, split in the serving model's
tokens), `embeddings` (packaged MiniLM, offline), `base` (the store interface and
`open_store(config)`, which picks the backend from retrieval.store), its backends `store` +
`faiss_store` (FAISS index + docstore over `generations`, the crash-safe on-disk format) and
`milvus_store` (Milvus Lite or a Milvus server), and `ingest` (the pipeline, plus `Retriever`
for queries). Importing this package does not import torch; the embedding model loads on first use.
"""
from ragserve.retrieval.chunking import Chunker, Document, load_documents
from ragserve.retrieval.embeddings import Embedder
from ragserve.retrieval.ingest import IngestReport, Retriever, ingest, ingest_documents
from ragserve.retrieval.store import AddResult, Collection, CollectionSpec, list_collections

__all__ = ["AddResult", "Chunker", "Collection", "CollectionSpec", "Document", "Embedder",
           "IngestReport", "Retriever", "ingest", "ingest_documents", "list_collections", "load_documents"]
