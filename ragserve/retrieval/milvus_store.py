"""The Milvus backend of `base.VectorStore` (pymilvus): Milvus Lite, embedded in this
process on a local .db file, or a Milvus server/cluster at an http:// URI. Same code.

Layout in Milvus (prefix = retrieval.milvus.collection_prefix):

    <prefix>catalog      the commit log: one row per committed batch of any collection
                         (name, generation, manifest = spec + counts); append-only
    <prefix><name>       one row per stored chunk version: vector, chunk fields, content
                         hash, metadata, and `born`/`dead`, the generations it lived in

Atomic batches without a transaction: `add` writes batch g = committed + 1 as rows with
born = g (invisible: readers filter `born <= committed and dead > committed`), marks the
rows it removes with dead = g (still visible for the same reason), and only then appends
the catalog row of g, a single-row insert that publishes the batch. A kill -9 before that
leaves generation g-1 exactly as it was; the next `add` drops the rows born after the
committed generation and revives the rows marked dead after it. Rows dead for two
generations are purged after each commit (one generation back stays readable for handles
that have not reloaded yet). Row keys are "<born>:<chunk id>", so an edited chunk's new
version never collides with the old one it replaces.

Writers of one collection are serialized by a local flock (<data dir>/milvus-locks): one
host may ingest into a collection at a time; reads scale out with Milvus.
"""
from __future__ import annotations

import json
import logging
import numbers
import threading
import time
from dataclasses import asdict, fields
from typing import Any, Iterable, Iterator

import numpy as np

from ragserve.config import MilvusConfig, data_dir
from ragserve.domain import Chunk, RetrievedChunk
from ragserve.errors import BadInput, NotFound, RagServeError
from ragserve.retrieval.base import StoredCollection, VectorStore
from ragserve.retrieval.generations import writer_lock
from ragserve.retrieval.store import AddResult, CollectionSpec, content_hash, validate_name

logger = logging.getLogger(__name__)

ALIVE = 2**62               # `dead` of a row no batch removed
MAX_TEXT_BYTES = 65535      # Milvus VARCHAR limit
MAX_ID_BYTES = 2048
MAX_TOP_K = 16384           # Milvus' limit on k
_PAGE = 4096                # rows per query page / insert call
_IN_LIST = 512              # values per `x in [...]` clause
_CHUNK_FIELDS = ["chunk_id", "doc_id", "text", "num_tokens", "title", "metadata", "hash"]
_SCALARS = (str, int, float, bool)
# Filter keys with their own scalar column (the effective value: metadata, else the chunk's
# field), because JSON-path filters are far slower; the datasets filter on doc_id.
_FILTER_COLUMNS = {"doc_id": "f_doc_id", "title": "f_title"}


def _lit(value: Any) -> str:
    """A filter-expression literal (strings double-quoted with JSON escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Number):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _in(field: str, values: Iterable[Any]) -> Iterator[str]:
    """`field in [...]` clauses of at most _IN_LIST values each."""
    values = list(values)
    for i in range(0, len(values), _IN_LIST):
        yield f"{field} in [{', '.join(_lit(v) for v in values[i:i + _IN_LIST])}]"


def milvus_name(prefix: str, name: str) -> str:
    """Collection name in Milvus: letters, digits and '_' only, reversible."""
    return prefix + name.replace("_", "__").replace(".", "_d").replace("-", "_h")


def filter_expr(filters: dict[str, Any]) -> str:
    """The Milvus expression of ragserve's filters (store.Collection.search semantics): every key
    must match, a list means any of. doc_id/title match their effective-value columns, other
    keys the `metadata` JSON."""
    if not isinstance(filters, dict) or not all(isinstance(key, str) for key in filters):
        raise BadInput(f"filters must map metadata keys to values, got {filters!r}")
    parts = []
    for key, v in filters.items():
        allowed = list(v) if isinstance(v, (list, tuple, set)) else [v]
        if not all(isinstance(a, _SCALARS) for a in allowed):
            raise BadInput(f"filter values must be strings, numbers or lists of them, got {filters!r}")
        if key in _FILTER_COLUMNS and not all(isinstance(a, str) for a in allowed):
            return "false"    # the effective doc_id/title of a chunk is a string
        if not allowed:
            return "false"
        field = _FILTER_COLUMNS.get(key) or f"metadata[{json.dumps(key, ensure_ascii=False)}]"
        parts.append("(" + " or ".join(f"{field} == {_lit(a)}" for a in allowed) + ")")
    return " and ".join(parts)


class MilvusStore(VectorStore):
    kind = "milvus"
    _shared: dict[tuple, "MilvusStore"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, config: MilvusConfig) -> None:
        from pymilvus import MilvusClient

        self.config = config
        self.uri = config.resolved_uri()
        self.lite = self.uri.endswith(".db")
        if self.lite:
            from pathlib import Path

            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(uri=self.uri, token=config.token or "", db_name=config.db_name,
                                       timeout=config.timeout_s)
        except Exception as exc:
            hint = ("Milvus Lite opens a .db file in one process at a time: stop the other ragserve "
                    "process or point retrieval.milvus.uri at a Milvus server" if self.lite else
                    "check retrieval.milvus.uri/token and that the server is up")
            raise RagServeError(f"cannot open Milvus at {self.uri!r} ({type(exc).__name__}: {exc}); {hint}") from None
        if self.lite:   # Milvus Lite has no MVCC timestamps: pymilvus' scans warn, Lite's server logs it
            logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoMvccWarning())
            logging.getLogger("grpc._server").addFilter(_NoMvccWarning())
        self._loaded: set[str] = set()
        self.catalog = config.collection_prefix + "catalog"
        self._ensure_catalog()

    @classmethod
    def shared(cls, config: MilvusConfig) -> "MilvusStore":
        """One client per (URI, database, prefix) and process: Milvus Lite allows one per file."""
        key = (config.resolved_uri(), config.token, config.db_name, config.collection_prefix)
        with cls._shared_lock:
            store = cls._shared.get(key)
            if store is None:
                store = cls._shared[key] = cls(config)
            return store

    @classmethod
    def close_all(cls) -> None:
        """Close every shared client (tests; Milvus Lite then releases its file lock at exit)."""
        with cls._shared_lock:
            for store in cls._shared.values():
                store.client.close()
                if store.lite:
                    from milvus_lite import server_manager_instance

                    server_manager_instance.release_server(store.uri)
            cls._shared.clear()

    # ---- catalog ------------------------------------------------------------------

    def _ensure_catalog(self) -> None:
        from pymilvus import DataType

        if self.client.has_collection(self.catalog):
            self.client.load_collection(self.catalog)   # a reopened Milvus Lite file starts released
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("name", DataType.VARCHAR, max_length=128)
        schema.add_field("generation", DataType.INT64)
        schema.add_field("manifest", DataType.JSON)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)   # Milvus needs a vector field
        index = self.client.prepare_index_params()
        index.add_index("vec", index_type="FLAT", metric_type="L2")
        self.client.create_collection(self.catalog, schema=schema, index_params=index,
                                      consistency_level="Strong")

    def _commits(self, name: str | None = None) -> list[dict[str, Any]]:
        expr = f"name == {_lit(name)}" if name is not None else "generation > 0"
        return self.client.query(self.catalog, filter=expr, output_fields=["name", "generation", "manifest"],
                                 limit=MAX_TOP_K)

    def _latest(self, name: str) -> dict[str, Any] | None:
        rows = self._commits(name)
        return max(rows, key=lambda r: r["generation"]) if rows else None

    def commit(self, name: str, generation: int, manifest: dict[str, Any]) -> None:
        """Publish `generation` of `name`: one single-row insert (the atomic step)."""
        self.client.insert(self.catalog, [{"pk": f"{name}:{generation:012d}", "name": name,
                                           "generation": generation, "manifest": manifest, "vec": [0.0, 0.0]}])
        # Older entries are never read again (the latest wins); keep the previous one for handles
        # that have not reloaded yet.
        self.client.delete(self.catalog, filter=f"name == {_lit(name)} and generation < {generation - 1}")

    # ---- VectorStore --------------------------------------------------------------

    def list_collections(self) -> list[str]:
        return sorted({r["name"] for r in self._commits()})

    def version(self, name: str) -> int | None:
        latest = self._latest(validate_name(name))
        return None if latest is None else int(latest["generation"])

    def open(self, name: str) -> "MilvusCollection":
        validate_name(name)
        latest = self._latest(name)
        if latest is None:
            existing = ", ".join(self.list_collections()) or "none"
            raise NotFound(f"collection {name!r} does not exist in Milvus at {self.uri!r} (existing: "
                           f"{existing}); ingest documents into it first")
        self.ensure_loaded(name)
        manifest = latest["manifest"]
        spec = CollectionSpec(**{f.name: manifest[f.name] for f in fields(CollectionSpec)})
        return MilvusCollection(self, name, spec, int(latest["generation"]), manifest)

    def create_or_open(self, name: str, spec: CollectionSpec) -> "MilvusCollection":
        validate_name(name)
        if self._latest(name) is None:
            return MilvusCollection(self, name, spec, 0, {})
        col = self.open(name)
        if col.spec != spec:
            diffs = ", ".join(f"{f.name}: stored {getattr(col.spec, f.name)!r} vs {getattr(spec, f.name)!r}"
                              for f in fields(spec) if getattr(col.spec, f.name) != getattr(spec, f.name))
            raise BadInput(f"collection {name!r} was built with other settings ({diffs}); "
                           f"use a new collection name or delete {name!r} first")
        return col

    def delete(self, name: str) -> None:
        validate_name(name)
        with self.writer_lock(name):
            if self._latest(name) is None:
                existing = ", ".join(self.list_collections()) or "none"
                raise NotFound(f"collection {name!r} does not exist (existing: {existing})")
            # Unlist first: a crash in between leaves an unlisted data collection, which the
            # next first ingest of that name drops.
            self.client.delete(self.catalog, filter=f"name == {_lit(name)}")
            self.client.drop_collection(self.data_name(name))
            self._loaded.discard(self.data_name(name))
        logger.info("deleted collection %s from Milvus", name)

    # ---- helpers for MilvusCollection ---------------------------------------------

    def ensure_loaded(self, name: str) -> None:
        coll = self.data_name(name)
        if coll not in self._loaded:
            self.client.load_collection(coll)
            self._loaded.add(coll)

    def data_name(self, name: str) -> str:
        return milvus_name(self.config.collection_prefix, name)

    def writer_lock(self, name: str):
        return writer_lock(data_dir() / "milvus-locks" / self.data_name(name))

    def create_data_collection(self, name: str, dim: int) -> None:
        from pymilvus import DataType

        coll = self.data_name(name)
        if self.client.has_collection(coll):   # left by a crashed first ingest or delete
            self.client.drop_collection(coll)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES + 24)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("born", DataType.INT64)
        schema.add_field("dead", DataType.INT64)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("hash", DataType.VARCHAR, max_length=64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("num_tokens", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        for column in _FILTER_COLUMNS.values():
            schema.add_field(column, DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.config.index_type, metric_type="IP",
                        params=dict(self.config.index_params))
        self.client.create_collection(coll, schema=schema, index_params=index, consistency_level="Strong")
        self._loaded.add(coll)

    def scan(self, name: str, expr: str, output_fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row matching `expr`, paged."""
        it = self.client.query_iterator(self.data_name(name), batch_size=_PAGE, filter=expr,
                                        output_fields=output_fields)
        try:
            while True:
                page = it.next()
                if not page:
                    return
                yield from page
        finally:
            it.close()


class _NoMvccWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "mvccTs" not in msg and "Method not implemented" not in msg


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
        return [row for clause in _in(field, values) for row in self._scan(clause, output_fields, gen)]

    # ---- reads --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._manifest.get("num_chunks", 0))

    @property
    def num_documents(self) -> int:
        return int(self._manifest.get("num_documents", 0))

    def chunk(self, chunk_id: str) -> Chunk:
        rows = self._by("chunk_id", [chunk_id], _CHUNK_FIELDS)
        if not rows:
            raise NotFound(f"chunk {chunk_id!r} is not in collection {self.name!r}")
        return _chunk(rows[0])

    def get_chunks(self, ids: Iterable[str]) -> list[Chunk]:
        ids = list(ids)
        found = {r["chunk_id"]: _chunk(r) for r in self._by("chunk_id", dict.fromkeys(ids), _CHUNK_FIELDS)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"chunk {missing[0]!r} is not in collection {self.name!r}")
        return [found[i] for i in ids]

    def iter_chunks(self) -> Iterator[Chunk]:
        return (_chunk(r) for r in self._scan("", _CHUNK_FIELDS))

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
                                       filter=expr, output_fields=_CHUNK_FIELDS,
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
            for start in range(0, len(rows), _PAGE):
                client.insert(coll, rows[start:start + _PAGE])
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
                **{column: str(c.metadata.get(key, getattr(c, key))) for key, column in _FILTER_COLUMNS.items()}}


# Test-only: called with a stage name ("rows_written", "committed"), so tests can kill the
# process between writing a batch's rows and publishing it.
_hook = None


def _commit_hook(stage: str) -> None:
    if _hook is not None:
        _hook(stage)
