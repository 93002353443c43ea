"""On-disk format of a collection: immutable generations switched by one pointer file.

Layout of `data_dir()/collections/<name>/`:

    CURRENT              one line, "gen-000007": the generation readers load
    gen-000007/          manifest.json, chunks.jsonl (row order = index order), index.faiss
    .lock                flock held by the one writer allowed at a time

`write_generation` writes a complete generation into a temporary folder, fsyncs it,
renames it to `gen-<n>` and only then replaces CURRENT with os.replace (+ directory
fsync). A crash at any point leaves CURRENT naming a complete generation; leftovers of
a crashed commit are removed by the next one. `store.Collection` owns the logic, this
module only the bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from ragserve.domain import Chunk
from ragserve.errors import RagServeError

MANIFEST_VERSION = 1
_GEN_RE = re.compile(r"^gen-(\d{6,})$")

# Test-only: called with a stage name at each step of a commit ("files_written",
# "generation_renamed", "pointer_written", "switched"), so tests can kill the process there.
_commit_hook: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Snapshot:
    """One loaded generation."""

    generation: int
    manifest: dict[str, Any]
    chunks: list[Chunk]
    hashes: list[str]           # content hash per chunk, same order
    index: Any                  # faiss.IndexFlatIP, row i = chunks[i]


def gen_name(gen: int) -> str:
    return f"gen-{gen:06d}"


def read_current(path: Path) -> int | None:
    """The committed generation of the collection folder `path`, None if never committed."""
    try:
        text = (path / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    m = _GEN_RE.fullmatch(text)
    if not m:
        raise RagServeError(f"{str(path / 'CURRENT')!r} holds {text!r}, not a generation; "
                            "the collection is damaged: delete it and re-ingest")
    return int(m.group(1))


def read_generation(path: Path, gen: int) -> Snapshot:
    gen_dir = path / gen_name(gen)
    manifest = json.loads((gen_dir / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("version") != MANIFEST_VERSION:
        raise RagServeError(f"collection {path.name!r} has format version {manifest.get('version')!r}, "
                            f"this ragserve reads {MANIFEST_VERSION}; re-ingest into a new collection")
    chunks, hashes = [], []
    with (gen_dir / "chunks.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            hashes.append(rec.pop("hash"))
            chunks.append(Chunk(**rec))
    index = faiss.deserialize_index(np.fromfile(gen_dir / "index.faiss", dtype=np.uint8))
    if index.ntotal != len(chunks):
        raise RagServeError(f"collection {path.name!r} generation {gen} is damaged ({index.ntotal} vectors, "
                            f"{len(chunks)} chunks); delete it and re-ingest")
    return Snapshot(gen, manifest, chunks, hashes, index)


def write_generation(path: Path, snap: Snapshot) -> None:
    """Persist `snap` as generation `snap.generation` and make it current. Hold `writer_lock`."""
    final = path / gen_name(snap.generation)
    tmp = path / f".tmp-{gen_name(snap.generation)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = (json.dumps({**asdict(c), "hash": h}, ensure_ascii=False) for c, h in zip(snap.chunks, snap.hashes))
    _write_synced(tmp / "chunks.jsonl", "".join(line + "\n" for line in lines).encode("utf-8"))
    _write_synced(tmp / "index.faiss", faiss.serialize_index(snap.index).tobytes())
    _write_synced(tmp / "manifest.json", json.dumps(snap.manifest, indent=2).encode("utf-8"))
    _fsync_dir(tmp)
    _hook("files_written")
    shutil.rmtree(final, ignore_errors=True)  # an unreferenced leftover of a crashed commit
    os.rename(tmp, final)
    _fsync_dir(path)
    _hook("generation_renamed")
    _write_synced(path / "CURRENT.tmp", (gen_name(snap.generation) + "\n").encode())
    _hook("pointer_written")
    os.replace(path / "CURRENT.tmp", path / "CURRENT")
    _fsync_dir(path)
    _hook("switched")
    # Readers that loaded CURRENT just before the switch may lose their files here;
    # Collection.open re-reads CURRENT and retries.
    for old in path.iterdir():
        if old.is_dir() and old != final and (_GEN_RE.fullmatch(old.name) or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `path/.lock`: one committing process per collection."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _hook(stage: str) -> None:
    if _commit_hook is not None:
        _commit_hook(stage)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
