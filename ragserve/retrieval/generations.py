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

The generation CURRENT named before a commit is kept (one previous generation, so disk
use is up to twice the collection): when the latest one is found damaged later (a torn
disk write, a truncated copy), `rollback` switches CURRENT back to it. The manifest
records each file's size and SHA-256, so damage is detected when a generation loads,
not on the first search. Nothing falls back silently: serving an older generation
loses acknowledged ingests, so an operator decides (`ragserve collections rollback`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
from ragserve.errors import CollectionDamaged

MANIFEST_VERSION = 1
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_FILES = ("chunks.jsonl", "index.faiss")   # checksummed in the manifest

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
        raise _damaged(path, None, f"CURRENT holds {text[:40]!r}, not a generation name")
    return int(m.group(1))


def stored_generations(path: Path) -> list[int]:
    """The generation folders present under `path`, oldest first (committed or not)."""
    if not path.is_dir():
        return []
    return sorted(int(m.group(1)) for p in path.iterdir() if p.is_dir() and (m := _GEN_RE.fullmatch(p.name)))


def read_generation(path: Path, gen: int) -> Snapshot:
    """Load generation `gen`. Raises CollectionDamaged when its files do not load or do not
    match the manifest; FileNotFoundError when its folder is gone (a concurrent commit)."""
    gen_dir = path / gen_name(gen)
    if not gen_dir.is_dir():
        raise FileNotFoundError(gen_dir)
    try:
        manifest = json.loads((gen_dir / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not an object")
        if manifest.get("version") != MANIFEST_VERSION:
            raise CollectionDamaged(f"collection {path.name!r} has format version {manifest.get('version')!r}, "
                                    f"this ragserve reads {MANIFEST_VERSION}; re-ingest into a new collection",
                                    path.name)
        for fname, expected in manifest.get("files", {}).items():
            data = (gen_dir / fname).read_bytes()
            if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise ValueError(f"{fname} has {len(data)} bytes that do not match the manifest "
                                 f"({expected['bytes']} bytes, sha256 {expected['sha256'][:12]}...)")
        chunks, hashes = [], []
        with (gen_dir / "chunks.jsonl").open(encoding="utf-8") as f:
            for num, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    hashes.append(rec.pop("hash"))
                    chunks.append(Chunk(**rec))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ValueError(f"chunks.jsonl line {num} does not parse ({exc})") from None
        try:
            index = faiss.deserialize_index(np.fromfile(gen_dir / "index.faiss", dtype=np.uint8))
        except RuntimeError as exc:  # faiss reports a torn file as RuntimeError
            raise ValueError(f"index.faiss does not load ({str(exc).splitlines()[0][:120]})") from None
        if index.ntotal != len(chunks):
            raise ValueError(f"index.faiss holds {index.ntotal} vectors, chunks.jsonl {len(chunks)} chunks")
    except CollectionDamaged:
        raise
    except FileNotFoundError as exc:
        if gen_dir.is_dir():   # the folder is there, a file of it is not
            raise _damaged(path, gen, f"{Path(exc.filename or '?').name} is missing") from None
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path, gen, str(exc)) from None
    return Snapshot(gen, manifest, chunks, hashes, index)


def rollback(path: Path) -> tuple[int | None, int]:
    """Point CURRENT at the newest stored generation older than it that loads, and delete the
    newer ones. Returns (the generation left, the one now current). Hold `writer_lock`.

    Raises CollectionDamaged when no older generation loads.
    """
    try:
        current = read_current(path)
    except CollectionDamaged:   # a garbled pointer: every stored generation is a candidate
        current = None
    stored = stored_generations(path)
    below = [g for g in stored if current is None or g < current]
    for gen in reversed(below):
        try:
            read_generation(path, gen)
        except (CollectionDamaged, FileNotFoundError):
            continue
        _switch(path, gen)
        for newer in (g for g in stored if g > gen):
            shutil.rmtree(path / gen_name(newer), ignore_errors=True)
        return current, gen
    raise CollectionDamaged(f"collection {path.name!r} has no earlier generation that loads "
                            f"(stored: {', '.join(map(str, stored)) or 'none'}); delete it and re-ingest",
                            path.name)


def _damaged(path: Path, gen: int | None, what: str) -> CollectionDamaged:
    """The error for a damaged collection, naming the ways out that exist on disk."""
    name = path.name
    which = f"generation {gen}" if gen is not None else "pointer"
    older = [g for g in stored_generations(path) if gen is None or g < gen]
    fix = f"delete it (DELETE /v1/collections/{name}) and re-ingest"
    if older:
        fix = (f"roll back to generation {older[-1]} with `ragserve collections rollback {name}` "
               f"(loses the changes committed since), or {fix}")
    return CollectionDamaged(f"collection {name!r} is damaged ({which}: {what}); {fix}", name)


def write_generation(path: Path, snap: Snapshot) -> None:
    """Persist `snap` as generation `snap.generation` and make it current. Hold `writer_lock`."""
    final = path / gen_name(snap.generation)
    tmp = path / f".tmp-{gen_name(snap.generation)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = (json.dumps({**asdict(c), "hash": h}, ensure_ascii=False) for c, h in zip(snap.chunks, snap.hashes))
    _write_synced(tmp / "chunks.jsonl", "".join(line + "\n" for line in lines).encode("utf-8"))
    _write_synced(tmp / "index.faiss", faiss.serialize_index(snap.index).tobytes())
    files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in _FILES}
    _write_synced(tmp / "manifest.json", json.dumps({**snap.manifest, "files": files}, indent=2).encode("utf-8"))
    _fsync_dir(tmp)
    _hook("files_written")
    shutil.rmtree(final, ignore_errors=True)  # an unreferenced leftover of a crashed commit
    os.rename(tmp, final)
    _fsync_dir(path)
    _hook("generation_renamed")
    try:
        previous = read_current(path)
    except CollectionDamaged:
        previous = None
    _switch(path, snap.generation)
    _hook("switched")
    # Keep the generation that was current (for `rollback`); readers that loaded an older
    # one just before the switch may lose their files here: Collection.open retries.
    keep = {final.name, gen_name(previous) if previous is not None else ""}
    for old in path.iterdir():
        if old.is_dir() and old.name not in keep and (_GEN_RE.fullmatch(old.name) or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)


def _switch(path: Path, gen: int) -> None:
    """Point CURRENT at `gen` atomically (write a temp file, os.replace, fsync the folder)."""
    _write_synced(path / "CURRENT.tmp", (gen_name(gen) + "\n").encode())
    _hook("pointer_written")
    os.replace(path / "CURRENT.tmp", path / "CURRENT")
    _fsync_dir(path)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
