"""Chunk KV store for CacheBlend: per-segment KV, reusable at any position in a prompt.

Who owns what: `Blender` (blend.py) decides what to store and computes missing entries;
this module only keeps tensors. An entry is keyed by `segment_key(model_id, context,
token_ids)`: a hash of the model, the tokens the segment was computed after (its
`context`: the prompt prefix for a chunk, nothing for the prefix itself) and the segment's
own token ids. It is not a prefix chain: the same chunk hits wherever it lands in a prompt.

Layout ("pre_rope"): keys are stored *before* rotary embedding, so a hit is rotated to
its new positions at blend time (CacheBlend's re-alignment, exact up to rounding).
Values need no change. Tensors are [num_layers, num_kv_heads, num_tokens, head_dim].

Tiers:
    RAM   an LRU over entries, bounded by bytes (`ram_budget_bytes`).
    disk  `<root>/<model_id>/<key[:2]>/<key>.safetensors`, written *behind*: `put` returns
          at once and a background thread writes the file (tmp + fsync + os.replace, so a
          crash never leaves a partial file under the final name). An entry evicted from
          RAM before its write completes is still written: the queue holds a reference.
An entry may carry small side tensors ("extras", e.g. LLMSteer's attention scores of the
chunk) under a name: same key, file `<key>.<name>.safetensors`, sharing the RAM LRU; they are
written at once (a few KB, computed once per chunk) and checked like entries.
Small JSON records about the store's contents (the blend gate's per-collection verdicts)
live under `<root>/<model_id>/meta/<name>.json`, beside the KV they describe.
A disk entry carries metadata (model id, dtype, layout, shape, token-id hash, CRC32 of the
tensor bytes) that is checked on every load. A truncated, corrupt or mismatching file is
logged at WARNING, deleted and reported as a miss; the caller recomputes and re-stores.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ragserve.fileio import atomic_write

logger = logging.getLogger(__name__)

LAYOUT = "pre_rope"
FORMAT_VERSION = "1"
_T = TypeVar("_T")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_META_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class KVSpec:
    """What every entry of one store must match (one store per model and dtype)."""

    model_id: str        # names the weights: registry name + source checksum (see model_fingerprint)
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass
class ChunkKV:
    """KV of one segment, computed alone (after its context tokens) at positions from 0."""

    keys: torch.Tensor     # [L, H_kv, n, D], pre-RoPE
    values: torch.Tensor   # [L, H_kv, n, D]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


@dataclass
class StoreStats:
    ram_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt: int = 0        # disk entries rejected (and deleted) on load
    writes: int = 0
    disk_read_s: float = 0.0


def model_fingerprint(model_path: Path, name: str, dtype: torch.dtype) -> str:
    """A filesystem-safe model id that changes whenever the weights or the dtype do."""
    h = hashlib.sha256()
    marker = model_path / "ragserve-source.json"   # written by models.model_dir: sha256 of the source
    for p in (marker, model_path / "config.json"):
        if p.is_file():
            h.update(p.read_bytes())
    h.update(str(dtype).encode())
    return f"{name}-{h.hexdigest()[:12]}"


def segment_key(model_id: str, context: Sequence[int], token_ids: Sequence[int]) -> str:
    """Content hash of one segment: the model, the tokens it was computed after, its tokens."""
    h = hashlib.sha256(model_id.encode())
    h.update(struct.pack(f"<I{len(context)}I", len(context), *context))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.hexdigest()


def _crc(*tensors: torch.Tensor) -> int:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(memoryview(t.contiguous().view(torch.uint8).numpy()), crc)
    return crc


def _nbytes(value: ChunkKV | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, ChunkKV) else value.numel() * value.element_size()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (8-byte length, then a JSON header)."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds file size {len(data)}")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


class KVStore:
    """Two-tier (RAM LRU + disk) store of `ChunkKV`s for one model. Thread-safe."""

    def __init__(self, root: Path, spec: KVSpec, ram_budget_bytes: int = 1 << 30,
                 write_behind: bool = True) -> None:
        self.spec = spec
        self.dir = Path(root) / spec.model_id
        self.ram_budget_bytes = ram_budget_bytes
        self.stats = StoreStats()
        # entries by key; extras by "<key>.<name>" (a key is hex, so the two never collide)
        self._ram: OrderedDict[str, ChunkKV | torch.Tensor] = OrderedDict()
        self._ram_bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[str, ChunkKV] = {}   # queued for the disk writer (still readable)
        self._queue: queue.Queue[tuple[str, ChunkKV] | None] | None = None
        self._writer: threading.Thread | None = None
        if write_behind:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_loop, name="ragserve-kv-writer", daemon=True)
            self._writer.start()

    # -- public API -------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str, num_tokens: int | None = None) -> ChunkKV | None:
        """RAM, then disk (verified, then promoted to RAM). None on a miss.

        `num_tokens`, when given, must match the entry (a stale or foreign file is a miss).
        """
        return self.lookup(key, num_tokens)[0]

    def lookup(self, key: str, num_tokens: int | None = None) -> tuple[ChunkKV | None, str]:
        """`get` that also says where the entry came from: "ram" | "disk" | "miss"."""
        with self._lock:
            kv = self._ram.get(key)
            if isinstance(kv, ChunkKV):
                self._ram.move_to_end(key)
                self.stats.ram_hits += 1
                return kv, "ram"
            kv = self._pending.get(key)   # evicted before its write landed
            if kv is not None:
                self._insert(key, kv)
                self.stats.ram_hits += 1
                return kv, "ram"
        kv = self._read(key, num_tokens)
        with self._lock:
            if kv is None:
                self.stats.misses += 1
                return None, "miss"
            self.stats.disk_hits += 1
            self._insert(key, kv)
        return kv, "disk"

    def put(self, key: str, kv: ChunkKV) -> None:
        """Insert into RAM and write to disk (behind, unless write_behind=False)."""
        self._check(kv)
        with self._lock:
            self._insert(key, kv)
            if self._queue is not None:
                if key in self._pending:
                    return
                self._pending[key] = kv
        if self._queue is not None:
            self._queue.put((key, kv))
        else:
            self._write(key, kv)

    def get_extra(self, key: str, name: str) -> torch.Tensor | None:
        """The side tensor `name` of entry `key` (RAM, then disk, verified); None when absent."""
        ram_key = self._extra_ram_key(key, name)
        with self._lock:
            value = self._ram.get(ram_key)
            if isinstance(value, torch.Tensor):
                self._ram.move_to_end(ram_key)
                return value
        path = self.extra_path(key, name)

        def decode(data: bytes) -> torch.Tensor:
            meta = _header_metadata(data)
            tensor = st_load(data)["tensor"]
            expect = {"format": FORMAT_VERSION, "model_id": self.spec.model_id, "key": key, "name": name}
            for field_name, want in expect.items():
                if meta.get(field_name) != want:
                    raise ValueError(f"metadata {field_name}={meta.get(field_name)!r}, expected {want!r}")
            if _crc(tensor) != int(meta["crc32"]):
                raise ValueError("checksum mismatch")
            return tensor

        tensor = self._load_verified(path, decode)
        if tensor is None:
            return None
        with self._lock:
            self._insert(ram_key, tensor)
        return tensor

    def put_extra(self, key: str, name: str, tensor: torch.Tensor) -> None:
        """Store the side tensor `name` of entry `key` in RAM and (synchronously) on disk."""
        ram_key = self._extra_ram_key(key, name)
        tensor = tensor.detach().contiguous().cpu()
        with self._lock:
            self._insert(ram_key, tensor)
        path = self.extra_path(key, name)
        meta = {"format": FORMAT_VERSION, "model_id": self.spec.model_id, "key": key, "name": name,
                "crc32": str(_crc(tensor))}
        try:
            atomic_write(path, st_save({"tensor": tensor}, metadata=meta))
        except OSError:   # a full disk must not fail the call: the tensor stays in RAM
            logger.exception("KV store: writing %s failed", path)

    def extra_path(self, key: str, name: str) -> Path:
        return self.dir / key[:2] / f"{key}.{name}.safetensors"

    @staticmethod
    def _extra_ram_key(key: str, name: str) -> str:
        if not _EXTRA_NAME.fullmatch(name):
            raise ValueError(f"extra name {name!r} must match {_EXTRA_NAME.pattern}")
        return f"{key}.{name}"

    def meta_path(self, name: str) -> Path:
        if not _META_NAME.fullmatch(name):
            raise ValueError(f"meta record name {name!r} must match {_META_NAME.pattern}")
        return self.dir / "meta" / f"{name}.json"

    def write_meta(self, name: str, record: dict) -> Path:
        """Store a small JSON record `name` (atomically; it replaces an older one)."""
        path = self.meta_path(name)
        atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode())
        return path

    def read_meta(self, name: str) -> dict | None:
        """The JSON record `name`, or None when absent; an unreadable one is logged and ignored."""
        path = self.meta_path(name)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("KV store: ignoring unreadable record %s (%s)", path, exc)
            return None
        return record if isinstance(record, dict) else None

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._ram or key in self._pending:
                return True
        return self.path(key).is_file()

    def drop_ram(self) -> None:
        """Empty the RAM tier (benchmarks: measure loads from disk). Pending writes still land."""
        with self._lock:
            self._ram.clear()
            self._ram_bytes = 0

    @property
    def ram_bytes(self) -> int:
        return self._ram_bytes

    def flush(self) -> None:
        """Block until every queued disk write has finished."""
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        if self._queue is not None and self._writer is not None:
            self._queue.put(None)
            self._writer.join(30)
            self._queue = None

    # -- RAM tier -----------------------------------------------------------------------
    def _insert(self, key: str, kv: ChunkKV | torch.Tensor) -> None:
        """Add as most recent and evict least recent past the byte budget (lock held)."""
        old = self._ram.pop(key, None)
        if old is not None:
            self._ram_bytes -= _nbytes(old)
        self._ram[key] = kv
        self._ram_bytes += _nbytes(kv)
        while self._ram_bytes > self.ram_budget_bytes and len(self._ram) > 1:
            _, evicted = self._ram.popitem(last=False)
            self._ram_bytes -= _nbytes(evicted)

    def _check(self, kv: ChunkKV) -> None:
        s = self.spec
        want = (s.num_layers, s.num_kv_heads, kv.num_tokens, s.head_dim)
        if tuple(kv.keys.shape) != want or tuple(kv.values.shape) != want:
            raise ValueError(f"KV shapes {tuple(kv.keys.shape)}/{tuple(kv.values.shape)} do not match "
                             f"the store's model {s.model_id}: expected {want}")
        if kv.keys.dtype != s.dtype or kv.values.dtype != s.dtype:
            raise ValueError(f"KV dtype {kv.keys.dtype} does not match the store's {s.dtype}")

    # -- disk tier ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                key, kv = item
                try:
                    self._write(key, kv)
                except Exception:  # a full disk must not kill serving: the entry stays in RAM
                    logger.exception("KV store: writing %s failed", self.path(key))
                finally:
                    with self._lock:
                        self._pending.pop(key, None)
            finally:
                q.task_done()

    def _write(self, key: str, kv: ChunkKV) -> None:
        path = self.path(key)
        if path.is_file():
            return
        keys, values = kv.keys.contiguous().cpu(), kv.values.contiguous().cpu()
        meta = {"format": FORMAT_VERSION, "model_id": self.spec.model_id, "dtype": str(keys.dtype),
                "layout": LAYOUT, "num_layers": str(keys.shape[0]), "num_kv_heads": str(keys.shape[1]),
                "num_tokens": str(keys.shape[2]), "head_dim": str(keys.shape[3]), "key": key,
                "crc32": str(_crc(keys, values))}
        atomic_write(path, st_save({"keys": keys, "values": values}, metadata=meta))
        self.stats.writes += 1

    def _read(self, key: str, num_tokens: int | None) -> ChunkKV | None:
        t0 = time.perf_counter()
        kv = self._load_verified(self.path(key), lambda data: self._decode(key, data, num_tokens))
        if kv is not None:
            self.stats.disk_read_s += time.perf_counter() - t0
        return kv

    def _load_verified(self, path: Path, decode: Callable[[bytes], _T]) -> _T | None:
        """Read and decode (verify) `path`: None when absent; a file that fails to decode is
        logged, deleted and counted corrupt, so the caller recomputes it."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode(data)
        except Exception as exc:
            logger.warning("KV store: rejecting %s (%s); deleting it, it will be recomputed", path, exc)
            with self._lock:
                self.stats.corrupt += 1
            path.unlink(missing_ok=True)
            return None

    def _decode(self, key: str, data: bytes, num_tokens: int | None) -> ChunkKV:
        meta = _header_metadata(data)
        tensors = st_load(data)   # raises on a truncated or malformed file
        keys, values = tensors["keys"], tensors["values"]
        s = self.spec
        expect = {"format": FORMAT_VERSION, "model_id": s.model_id, "dtype": str(s.dtype),
                  "layout": LAYOUT, "key": key}
        for name, want in expect.items():
            if meta.get(name) != want:
                raise ValueError(f"metadata {name}={meta.get(name)!r}, expected {want!r}")
        n = int(meta["num_tokens"])
        if num_tokens is not None and n != num_tokens:
            raise ValueError(f"{n} tokens stored, {num_tokens} expected")
        shape = (s.num_layers, s.num_kv_heads, n, s.head_dim)
        if tuple(keys.shape) != shape or tuple(values.shape) != shape:
            raise ValueError(f"shape {tuple(keys.shape)}, expected {shape}")
        if _crc(keys, values) != int(meta["crc32"]):
            raise ValueError("checksum mismatch")
        return ChunkKV(keys, values)

