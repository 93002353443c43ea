"""Collections: a FAISS inner-product index plus a docstore, persisted crash-safely.

A `Collection` is held in memory; `add` commits a complete new generation through
`generations.write_generation` (temp folder -> rename -> atomic CURRENT switch), so a
crash at any point leaves the previous state loadable. A collection exists once its first
commit has switched CURRENT: a failed first ingest leaves nothing behind. The in-memory
copy is replaced only after the switch succeeded.

Vectors are unit length, so inner product = cosine similarity. The index is exact
(`IndexFlatIP`); filtered searches score the matching rows exhaustively from the
reconstructed vector matrix, so they return the true top-k among matching chunks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import faiss
import numpy as np

from ragserve.config import data_dir
from ragserve.domain import Chunk, RetrievedChunk
from ragserve.errors import BadInput, CollectionDamaged, NotFound, RagServeError
from ragserve.retrieval.base import StoredCollection
from ragserve.retrieval.generations import (MANIFEST_VERSION, Snapshot, gen_name, read_current, read_generation,
                                            rollback, write_generation, writer_lock)

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Filter keys that fall back to the Chunk's own field when the metadata lacks them.
_CHUNK_FIELD_KEYS = ("doc_id", "title")
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class CollectionSpec:
    """What every chunk in a collection shares; mixing settings would corrupt it."""

    embedding_model: str        # vectors are only comparable within one model
    dim: int
    tokenizer: str              # Chunk.num_tokens is counted in this tokenizer
    chunk_tokens: int
    chunk_overlap_tokens: int


class AddResult(NamedTuple):
    added: int                  # chunks stored
    skipped: int                # chunks whose text was already stored
    removed: int = 0            # stale chunks dropped (a re-ingested, edited document)


def content_hash(text: str) -> str:
    """Dedupe key: the chunk text after Unicode NFC and whitespace collapsing."""
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def collections_root() -> Path:
    return data_dir() / "collections"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BadInput(f"bad collection name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                       "starting with a letter or digit")
    return name


def check_spec(name: str, stored: CollectionSpec, wanted: CollectionSpec) -> None:
    """BadInput naming every setting where a stored collection differs from the one asked for."""
    if stored != wanted:
        diffs = ", ".join(f"{f.name}: stored {getattr(stored, f.name)!r} vs {getattr(wanted, f.name)!r}"
                          for f in fields(wanted) if getattr(stored, f.name) != getattr(wanted, f.name))
        raise BadInput(f"collection {name!r} was built with other settings ({diffs}); "
                       f"use a new collection name or delete {name!r} first")


def list_collections() -> list[str]:
    root = collections_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _NAME_RE.fullmatch(p.name) and (p / "CURRENT").is_file())


def collection_sizes() -> dict[str, int]:
    """Chunks per collection, from each committed manifest (no index is loaded); a
    collection whose manifest does not read is left out."""
    out = {}
    for name in list_collections():
        path = collections_root() / name
        try:
            gen = read_current(path)
            manifest = json.loads((path / gen_name(gen) / "manifest.json").read_text(encoding="utf-8"))
            out[name] = int(manifest["num_chunks"])
        except (CollectionDamaged, OSError, ValueError, KeyError, TypeError):
            continue
    return out


@dataclass(frozen=True)
class _Rows:
    """The in-memory contents, replaced as a whole so a concurrent search never mixes two."""

    chunks: list[Chunk]
    hashes: list[str]           # content hash per chunk
    vectors: np.ndarray         # (n, dim) float32, unit rows; row i = chunks[i]
    index: Any                  # IndexFlatIP over `vectors` (a GPU copy when faiss has GPUs)
    row_by_id: dict[str, int]

    @classmethod
    def build(cls, chunks: list[Chunk], hashes: list[str], vectors: np.ndarray, index: Any = None) -> "_Rows":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
        return cls(chunks, hashes, vectors, _maybe_gpu(index), {c.id: i for i, c in enumerate(chunks)})


class Collection(StoredCollection):
    """One named collection, held in memory; `add` commits a new generation to disk.

    Reads are safe from several threads; `add` is serialized per collection (flock).
    """

    def __init__(self, name: str, spec: CollectionSpec) -> None:
        """An empty, not yet persisted collection. Use `create_or_open` or `open`."""
        self.name = validate_name(name)
        self.spec = spec
        self.path = collections_root() / name
        self.generation = 0                    # 0 = never committed
        self._rows = _Rows.build([], [], np.zeros((0, spec.dim), dtype=np.float32))

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def create_or_open(cls, name: str, spec: CollectionSpec) -> "Collection":
        """Open `name`, or start a new one that is written by its first `add`.

        Raises BadInput when the stored collection was built with another spec.
        """
        validate_name(name)
        if name not in list_collections():
            return cls(name, spec)
        col = cls.open(name)
        check_spec(name, col.spec, spec)
        return col

    @classmethod
    def open(cls, name: str) -> "Collection":
        validate_name(name)
        if name not in list_collections():
            existing = ", ".join(list_collections()) or "none"
            raise NotFound(f"collection {name!r} does not exist (existing: {existing}); ingest documents into it first")
        path = collections_root() / name
        for _ in range(5):  # a concurrent commit may delete the generation we are reading
            gen = read_current(path)
            try:
                return cls._from_snapshot(name, read_generation(path, gen))
            except FileNotFoundError:
                if read_current(path) == gen:
                    raise CollectionDamaged(f"collection {name!r} names generation {gen}, which is not on "
                                            "disk; delete it and re-ingest", name) from None
        raise RagServeError(f"collection {name!r} keeps changing while being opened; retry")

    @staticmethod
    def rollback(name: str) -> tuple[int | None, int]:
        """Switch `name` back to its previous stored generation (after the latest was found
        damaged, or to undo the last ingest). Returns (generation left, generation now current)."""
        validate_name(name)
        path = collections_root() / name
        if not (path / "CURRENT").is_file():
            existing = ", ".join(list_collections()) or "none"
            raise NotFound(f"collection {name!r} does not exist (existing: {existing})")
        with writer_lock(path):
            left, now = rollback(path)
        logger.warning("collection %s rolled back from generation %s to %d", name, left, now)
        return left, now

    @staticmethod
    def delete(name: str) -> None:
        validate_name(name)
        path = collections_root() / name
        if not path.is_dir():
            existing = ", ".join(list_collections()) or "none"
            raise NotFound(f"collection {name!r} does not exist (existing: {existing})")
        # Rename first so a crash mid-delete never leaves a half-deleted collection visible.
        trash = collections_root() / f".deleted-{name}-{os.getpid()}-{time.time_ns()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted collection %s", name)

    @classmethod
    def _from_snapshot(cls, name: str, snap: Snapshot) -> "Collection":
        missing = [f.name for f in fields(CollectionSpec) if f.name not in snap.manifest]
        if missing:
            raise CollectionDamaged(f"collection {name!r} manifest lacks {', '.join(missing)}; "
                                    "delete it and re-ingest", name)
        spec = CollectionSpec(**{f.name: snap.manifest[f.name] for f in fields(CollectionSpec)})
        if snap.index.d != spec.dim:
            raise CollectionDamaged(f"collection {name!r} index has dim {snap.index.d}, its manifest says "
                                    f"{spec.dim}; delete it and re-ingest", name)
        col = cls(name, spec)
        col.generation = snap.generation
        vectors = snap.index.reconstruct_n(0, snap.index.ntotal).reshape(-1, spec.dim)  # (n, dim)
        col._rows = _Rows.build(snap.chunks, snap.hashes, vectors, snap.index)
        return col

    # ---- reads --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows.chunks)

    @property
    def num_documents(self) -> int:
        return len({c.doc_id for c in self._rows.chunks})

    def chunk(self, chunk_id: str) -> Chunk:
        rows = self._rows
        row = rows.row_by_id.get(chunk_id)
        if row is None:
            raise NotFound(f"chunk {chunk_id!r} is not in collection {self.name!r}")
        return rows.chunks[row]

    def iter_chunks(self) -> Iterator[Chunk]:
        """Every stored chunk, in storage order (one snapshot: a concurrent commit is not seen)."""
        return iter(self._rows.chunks)

    def get_chunks(self, ids: Iterable[str]) -> list[Chunk]:
        return [self.chunk(i) for i in ids]

    def chunk_hashes(self, doc_ids: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
        """Stored chunk id -> (doc_id, content hash), of `doc_ids` only when given: lets ingest
        spot edited documents."""
        rows = self._rows
        wanted = None if doc_ids is None else set(doc_ids)
        return {c.id: (c.doc_id, h) for c, h in zip(rows.chunks, rows.hashes)
                if wanted is None or c.doc_id in wanted}

    def new_chunks(self, chunks: Iterable[Chunk], remove_ids: Iterable[str] = ()) -> list[Chunk]:
        """The chunks `add` would store: text not stored (after removing `remove_ids`), first copy only."""
        removed = set(remove_ids)
        rows = self._rows
        seen = {h for c, h in zip(rows.chunks, rows.hashes) if c.id not in removed}
        out = []
        for c in chunks:
            h = content_hash(c.text)
            if h not in seen:
                seen.add(h)
                out.append(c)
        return out

    def search(self, query_embedding: np.ndarray, k: int,
               filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
        """Top-`k` chunks by cosine similarity, best first.

        `filters` maps a metadata key to a value (equality) or a list of values (any of);
        "doc_id"/"title" fall back to the chunk's own field. With filters, fewer than `k`
        chunks come back when fewer match.
        """
        data = self._rows
        n = len(data.chunks)
        q = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.spec.dim:
            raise BadInput(f"query embedding has dim {q.shape[0]}, collection {self.name!r} expects {self.spec.dim}")
        if not isinstance(k, numbers.Integral) or k < 1 or k > n:
            raise BadInput(f"k={k!r} is out of range: collection {self.name!r} has {n} chunks; ask for 1..{n}")
        q = _unit(q[None, :])  # (1, dim)
        if filters:
            rows = _matching_rows(data.chunks, filters)
            scores = data.vectors[rows] @ q[0]                     # (m,)
            order = np.argsort(-scores, kind="stable")[:k]         # best first
            hits = zip(rows[order].tolist(), scores[order].tolist())
        else:
            scores_2d, rows_2d = data.index.search(q, k)           # (1, k) each
            hits = zip(rows_2d[0].tolist(), scores_2d[0].tolist())
        return [RetrievedChunk(chunk=data.chunks[r], score=float(s)) for r, s in hits if r >= 0]

    # ---- writes -------------------------------------------------------------------

    def add(self, chunks: list[Chunk], embeddings: np.ndarray, remove_ids: Iterable[str] = ()) -> AddResult:
        """Store `chunks` (row i of `embeddings` belongs to chunk i) and drop `remove_ids`.

        Chunks whose text is already stored are skipped. Commits one new generation,
        or nothing when nothing changes. Another process's commit in between is merged.
        """
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (len(chunks), self.spec.dim):
            raise BadInput(f"embeddings have shape {vectors.shape}, expected ({len(chunks)}, {self.spec.dim})")
        with writer_lock(self.path):
            current = read_current(self.path)
            if current is not None and current != self.generation:
                fresh = Collection._from_snapshot(self.name, read_generation(self.path, current))
                if fresh.spec != self.spec:
                    raise BadInput(f"collection {self.name!r} was rebuilt with other settings by another "
                                   "process while this one was adding; reopen it and retry")
                self.generation, self._rows = fresh.generation, fresh._rows
            old = self._rows
            removed = set(remove_ids)
            keep = [i for i, c in enumerate(old.chunks) if c.id not in removed]
            kept_ids = {old.chunks[i].id: old.hashes[i] for i in keep}
            seen = set(kept_ids.values())
            new_rows, new_hashes = [], []
            for i, c in enumerate(chunks):
                h = content_hash(c.text)
                if h in seen:
                    continue
                if c.id in kept_ids:
                    raise BadInput(f"chunk id {c.id!r} is already stored in {self.name!r} with other text; "
                                   "re-ingest its whole document so the stale chunks are replaced")
                seen.add(h)
                kept_ids[c.id] = h
                new_rows.append(i)
                new_hashes.append(h)
            result = AddResult(added=len(new_rows), skipped=len(chunks) - len(new_rows),
                               removed=len(old.chunks) - len(keep))
            if not new_rows and not result.removed:
                return result
            all_chunks = [old.chunks[i] for i in keep] + [chunks[i] for i in new_rows]
            all_hashes = [old.hashes[i] for i in keep] + new_hashes
            all_vectors = np.concatenate([old.vectors[keep], _unit(vectors[new_rows])])  # (n, dim)
            self._commit(all_chunks, all_hashes, all_vectors)
        logger.info("collection %s: +%d chunks, %d skipped, %d removed -> %d (generation %d)",
                    self.name, result.added, result.skipped, result.removed, len(self), self.generation)
        return result

    def _commit(self, chunks: list[Chunk], hashes: list[str], vectors: np.ndarray) -> None:
        index = faiss.IndexFlatIP(self.spec.dim)
        index.add(vectors)
        gen = self.generation + 1
        manifest = {"version": MANIFEST_VERSION, "name": self.name, **asdict(self.spec),
                    "num_chunks": len(chunks), "num_documents": len({c.doc_id for c in chunks}),
                    "generation": gen, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_generation(self.path, Snapshot(gen, manifest, chunks, hashes, index))
        self.generation, self._rows = gen, _Rows.build(chunks, hashes, vectors, index)


def _matching_rows(chunks: list[Chunk], filters: dict[str, Any]) -> np.ndarray:
    if not isinstance(filters, dict) or not all(isinstance(key, str) for key in filters):
        raise BadInput(f"filters must map metadata keys to values, got {filters!r}")
    wanted = {key: list(v) if isinstance(v, (list, tuple, set)) else [v] for key, v in filters.items()}
    if not all(isinstance(a, _SCALARS) for allowed in wanted.values() for a in allowed):
        raise BadInput(f"filter values must be strings, numbers or lists of them, got {filters!r}")
    missing = object()

    def value(c: Chunk, key: str) -> Any:
        v = c.metadata.get(key, missing)
        return getattr(c, key) if v is missing and key in _CHUNK_FIELD_KEYS else v

    rows = [i for i, c in enumerate(chunks)
            if all(value(c, key) in allowed for key, allowed in wanted.items())]
    return np.asarray(rows, dtype=np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _maybe_gpu(index: Any) -> Any:
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except Exception as e:  # a broken GPU setup must not stop CPU search
            logger.warning("FAISS GPU index failed (%s); searching on CPU", e)
    return index
