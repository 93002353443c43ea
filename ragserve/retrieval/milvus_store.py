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

`MilvusStore` (this module) owns the client, the catalog and the data collections' schema;
`milvus_collection.MilvusCollection` reads and writes one collection.

Writers of one collection are serialized by a local flock (<data dir>/milvus-locks): one
host may ingest into a collection at a time; reads scale out with Milvus.
"""
from __future__ import annotations

import json
import logging
import numbers
import threading
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ragserve.config import MilvusConfig, data_dir
from ragserve.errors import BadInput, NotFound, RagServeError
from ragserve.retrieval.base import VectorStore
from ragserve.retrieval.generations import writer_lock
from ragserve.retrieval.store import CollectionSpec, check_spec, validate_name

if TYPE_CHECKING:
    from ragserve.retrieval.milvus_collection import MilvusCollection

logger = logging.getLogger(__name__)

ALIVE = 2**62               # `dead` of a row no batch removed
MAX_TEXT_BYTES = 65535      # Milvus VARCHAR limit
MAX_ID_BYTES = 2048
MAX_TOP_K = 16384           # Milvus' limit on k
PAGE = 4096                # rows per query page / insert call
_IN_LIST = 512              # values per `x in [...]` clause
CHUNK_FIELDS = ["chunk_id", "doc_id", "text", "num_tokens", "title", "metadata", "hash"]
_SCALARS = (str, int, float, bool)
# Filter keys with their own scalar column (the effective value: metadata, else the chunk's
# field), because JSON-path filters are far slower; the datasets filter on doc_id.
FILTER_COLUMNS = {"doc_id": "f_doc_id", "title": "f_title"}


def _lit(value: Any) -> str:
    """A filter-expression literal (strings double-quoted with JSON escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Number):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def in_clauses(field: str, values: Iterable[Any]) -> Iterator[str]:
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
        if key in FILTER_COLUMNS and not all(isinstance(a, str) for a in allowed):
            return "false"    # the effective doc_id/title of a chunk is a string
        if not allowed:
            return "false"
        field = FILTER_COLUMNS.get(key) or f"metadata[{json.dumps(key, ensure_ascii=False)}]"
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
        from ragserve.retrieval.milvus_collection import MilvusCollection

        manifest = latest["manifest"]
        spec = CollectionSpec(**{f.name: manifest[f.name] for f in fields(CollectionSpec)})
        return MilvusCollection(self, name, spec, int(latest["generation"]), manifest)

    def create_or_open(self, name: str, spec: CollectionSpec) -> "MilvusCollection":
        from ragserve.retrieval.milvus_collection import MilvusCollection

        validate_name(name)
        if self._latest(name) is None:
            return MilvusCollection(self, name, spec, 0, {})
        col = self.open(name)
        check_spec(name, col.spec, spec)
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
        for column in FILTER_COLUMNS.values():
            schema.add_field(column, DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.config.index_type, metric_type="IP",
                        params=dict(self.config.index_params))
        self.client.create_collection(coll, schema=schema, index_params=index, consistency_level="Strong")
        self._loaded.add(coll)

    def scan(self, name: str, expr: str, output_fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row matching `expr`, paged."""
        it = self.client.query_iterator(self.data_name(name), batch_size=PAGE, filter=expr,
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
