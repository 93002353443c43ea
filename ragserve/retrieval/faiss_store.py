"""The FAISS backend of `base.VectorStore`: collections as generation folders under
<data dir>/collections (store.Collection owns the logic, generations.py the bytes)."""
from __future__ import annotations

from ragserve.retrieval.base import VectorStore
from ragserve.retrieval.generations import read_current
from ragserve.retrieval.store import (Collection, CollectionSpec, collection_sizes, collections_root, list_collections,
                                      validate_name)


class FaissStore(VectorStore):
    kind = "faiss"

    def list_collections(self) -> list[str]:
        return list_collections()

    def open(self, name: str) -> Collection:
        return Collection.open(name)

    def collection_sizes(self) -> dict[str, int]:
        return collection_sizes()   # from the manifests: no index is loaded

    def create_or_open(self, name: str, spec: CollectionSpec) -> Collection:
        return Collection.create_or_open(name, spec)

    def delete(self, name: str) -> None:
        Collection.delete(name)

    def version(self, name: str) -> int | None:
        return read_current(collections_root() / validate_name(name))
