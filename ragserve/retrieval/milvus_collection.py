"""MilvusCollection: one collection of the Milvus store (layout and the batch protocol:
milvus_store's module docstring). Reads filter to the handle's committed generation; `add`
writes a batch invisibly, then publishes it with one catalog row (`MilvusStore.commit`)."""
from __future__ import annotations

import logging
import numbers
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from ragserve.domain import Chunk, RetrievedChunk
from ragserve.errors import BadInput, NotFound
from ragserve.retrieval.base import StoredCollection
from ragserve.retrieval.milvus_store import (ALIVE, CHUNK_FIELDS, FILTER_COLUMNS, MAX_ID_BYTES, MAX_TEXT_BYTES,
                                             MAX_TOP_K, PAGE, filter_expr, in_clauses)
from ragserve.retrieval.store import AddResult, CollectionSpec, content_hash

if TYPE_CHECKING:
    from ragserve.retrieval.milvus_store import MilvusStore

logger = logging.getLogger(__name__)


def _chunk(row: dict[str, Any]) -> Chunk:
    return Chunk(id=row["chunk_id"], doc_id=row["doc_id"], text=row["text"], num_tokens=int(row["num_tokens"]),
                 title=row["title"], metadata=dict(row.get("metadata") or {}))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


class MilvusCollection(StoredCollection):
    """A handle on one committed generation of a collection in Milvus (see the module docstring)."""

    def __init__(self, store: MilvusStore, name: str, spec: CollectionSpec, generation: int,
                 manifest: dict[str, Any]) -> None:
        self.store = store
        self.name = name
        self.spec = spec
        self.generation = generation
        self._manifest = manifest

    def _visible(self, gen: int | None = None) -> str:
        g = self.generation if gen is None else gen
        return f"born <= {g} and dead > {g}"

    def _scan(self, expr: str, output_fields: list[str], gen: int | None = None) -> Iterator[dict[str, Any]]:
        if (self.generation if gen is None else gen) == 0:
            return iter(())
        return self.store.scan(self.name, f"({self._visible(gen)}) and ({expr})" if expr else self._visible(gen),
                               output_fields)

    def _by(self, field: str, values: Iterable[Any], output_fields: list[str],
            gen: int | None = None) -> list[dict[str, Any]]:
        return [row for clause in in_clauses(field, values) for row in self._scan(clause, output_fields, gen)]

    # ---- reads --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._manifest.get("num_chunks", 0))

    @property
    def num_documents(self) -> int:
        return int(self._manifest.get("num_documents", 0))

    def chunk(self, chunk_id: str) -> Chunk:
        rows = self._by("chunk_id", [chunk_id], CHUNK_FIELDS)
        if not rows:
            raise NotFound(f"chunk {chunk_id!r} is not in collection {self.name!r}")
        return _chunk(rows[0])

    def get_chunks(self, ids: Iterable[str]) -> list[Chunk]:
        ids = list(ids)
        found = {r["chunk_id"]: _chunk(r) for r in self._by("chunk_id", dict.fromkeys(ids), CHUNK_FIELDS)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"chunk {missing[0]!r} is not in collection {self.name!r}")
        return [found[i] for i in ids]

    def iter_chunks(self) -> Iterator[Chunk]:
        return (_chunk(r) for r in self._scan("", CHUNK_FIELDS))

    def chunk_hashes(self, doc_ids: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
        fields_ = ["chunk_id", "doc_id", "hash"]
        rows = self._scan("", fields_) if doc_ids is None else self._by("doc_id", dict.fromkeys(doc_ids), fields_)
        return {r["chunk_id"]: (r["doc_id"], r["hash"]) for r in rows}

    def new_chunks(self, chunks: Iterable[Chunk], remove_ids: Iterable[str] = ()) -> list[Chunk]:
        chunks = list(chunks)
        return [chunks[i] for i in self._new_rows(chunks, [content_hash(c.text) for c in chunks],
                                                  set(remove_ids), self.generation)]

    def _new_rows(self, chunks: list[Chunk], hashes: list[str], removed: set[str], gen: int) -> list[int]:
        """Indexes of `chunks` whose text is neither stored at `gen` (outside `removed`) nor earlier in the list."""
        seen = {r["hash"] for r in self._by("hash", dict.fromkeys(hashes), ["chunk_id", "hash"], gen)
                if r["chunk_id"] not in removed}
        out = []
        for i, h in enumerate(hashes):
            if h not in seen:
                seen.add(h)
                out.append(i)
        return out

    def search(self, query_embedding: np.ndarray, k: int,
               filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
        """As store.Collection.search: exact top-k with a FLAT index, filters on metadata."""
        n = len(self)
        q = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.spec.dim:
            raise BadInput(f"query embedding has dim {q.shape[0]}, collection {self.name!r} expects {self.spec.dim}")
        if not isinstance(k, numbers.Integral) or k < 1 or k > n:
            raise BadInput(f"k={k!r} is out of range: collection {self.name!r} has {n} chunks; ask for 1..{n}")
        if k > MAX_TOP_K:
            raise BadInput(f"k={k} is above Milvus' limit of {MAX_TOP_K}; ask for fewer chunks")
        expr = self._visible()
        if filters:
            expr = f"({expr}) and ({filter_expr(filters)})"
        q = _unit(q[None, :])[0]
        res = self.store.client.search(self.store.data_name(self.name), data=[q.tolist()], limit=int(k),
                                       filter=expr, output_fields=CHUNK_FIELDS,
                                       search_params={"metric_type": "IP",
                                                      "params": dict(self.store.config.search_params)})
        return [RetrievedChunk(chunk=_chunk(hit["entity"]), score=float(hit["distance"])) for hit in res[0]]

    # ---- writes -------------------------------------------------------------------

    def add(self, chunks: list[Chunk], embeddings: np.ndarray, remove_ids: Iterable[str] = ()) -> AddResult:
        """Commit one batch (module docstring); another process's commit in between is merged."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (len(chunks), self.spec.dim):
            raise BadInput(f"embeddings have shape {vectors.shape}, expected ({len(chunks)}, {self.spec.dim})")
        for c in chunks:
            if len(c.text.encode()) > MAX_TEXT_BYTES or len(c.title.encode()) > MAX_TEXT_BYTES:
                raise BadInput(f"chunk {c.id!r} holds more than {MAX_TEXT_BYTES} bytes of text, Milvus' limit; "
                               "ingest with a smaller chunk size")
            if len(c.id.encode()) > MAX_ID_BYTES or len(c.doc_id.encode()) > MAX_ID_BYTES:
                raise BadInput(f"chunk id {c.id[:80]!r}... is longer than {MAX_ID_BYTES} bytes; use shorter document ids")
        store, client, coll = self.store, self.store.client, self.store.data_name(self.name)
        with store.writer_lock(self.name):
            latest = store._latest(self.name)
            current = 0 if latest is None else int(latest["generation"])
            if current != self.generation:
                if current == 0:
                    raise NotFound(f"collection {self.name!r} was deleted by another process while this one "
                                   "was adding; retry the ingest")
                fresh = store.open(self.name)
                if fresh.spec != self.spec:
                    raise BadInput(f"collection {self.name!r} was rebuilt with other settings by another "
                                   "process while this one was adding; reopen it and retry")
                self.generation, self._manifest = fresh.generation, fresh._manifest
            if current == 0:
                store.create_data_collection(self.name, self.spec.dim)
            else:
                self._recover(current)
            removed_ids = set(remove_ids)
            removed = self._by("chunk_id", removed_ids, ["*"]) if removed_ids else []
            hashes = [content_hash(c.text) for c in chunks]
            new_rows = self._new_rows(chunks, hashes, removed_ids, current)
            kept = {r["chunk_id"] for r in self._by("chunk_id", {chunks[i].id for i in new_rows}, ["chunk_id"])
                    if r["chunk_id"] not in removed_ids}
            seen_ids: set[str] = set()
            for i in new_rows:
                cid = chunks[i].id
                if cid in kept or cid in seen_ids:
                    raise BadInput(f"chunk id {cid!r} is already stored in {self.name!r} with other text; "
                                   "re-ingest its whole document so the stale chunks are replaced")
                seen_ids.add(cid)
            result = AddResult(added=len(new_rows), skipped=len(chunks) - len(new_rows), removed=len(removed))
            if not new_rows and not removed:
                return result
            gen = current + 1
            affected = {chunks[i].doc_id for i in new_rows} | {r["doc_id"] for r in removed}
            docs_before = {r["doc_id"] for r in self._by("doc_id", affected, ["doc_id"], current)}
            unit = _unit(vectors[new_rows]) if new_rows else vectors[:0]
            rows = [self._row(chunks[i], hashes[i], unit[j], gen) for j, i in enumerate(new_rows)]
            for start in range(0, len(rows), PAGE):
                client.insert(coll, rows[start:start + PAGE])
            if removed:
                client.upsert(coll, [{**r, "dead": gen} for r in removed])
            docs_after = {r["doc_id"] for r in self._by("doc_id", affected, ["doc_id"], gen)}
            manifest = {**asdict(self.spec), "num_chunks": len(self) + len(new_rows) - len(removed),
                        "num_documents": self.num_documents - len(docs_before) + len(docs_after),
                        "generation": gen, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _commit_hook("rows_written")
            store.commit(self.name, gen, manifest)
            self.generation, self._manifest = gen, manifest
            _commit_hook("committed")
            client.delete(coll, filter=f"dead < {gen}")   # invisible to this and the previous generation
            if store.lite:
                client.flush(coll)    # Milvus Lite searches flushed segments much faster than its memtable
        logger.info("collection %s (milvus): +%d chunks, %d skipped, %d removed -> %d (generation %d)",
                    self.name, result.added, result.skipped, result.removed, len(self), self.generation)
        return result

    def _recover(self, current: int) -> None:
        """Undo a crashed batch: drop rows born after `current`, revive rows it marked dead."""
        coll = self.store.data_name(self.name)
        self.store.client.delete(coll, filter=f"born > {current}")
        marked = list(self.store.scan(self.name, f"dead > {current} and dead < {ALIVE}", ["*"]))
        if marked:
            self.store.client.upsert(coll, [{**r, "dead": ALIVE} for r in marked])
            logger.warning("collection %s: undid a crashed batch (%d removals revived)", self.name, len(marked))

    @staticmethod
    def _row(c: Chunk, h: str, vector: np.ndarray, gen: int) -> dict[str, Any]:
        return {"pk": f"{gen}:{c.id}", "vector": vector.tolist(), "born": gen, "dead": ALIVE,
                "chunk_id": c.id, "doc_id": c.doc_id, "hash": h, "title": c.title, "text": c.text,
                "num_tokens": int(c.num_tokens), "metadata": dict(c.metadata),
                **{column: str(c.metadata.get(key, getattr(c, key))) for key, column in FILTER_COLUMNS.items()}}


# Test-only: called with a stage name ("rows_written", "committed"), so tests can kill the
# process between writing a batch's rows and publishing it.
_hook = None


def _commit_hook(stage: str) -> None:
    if _hook is not None:
        _hook(stage)
