"""What the running server holds: the runtime, admission counters, locks and metrics.

One `ServerState` per app, created by `create_app` and filled in by the lifespan (the
runtime loads the model there). Routes reach it through `deps.StateDep`. Everything here
lives on the event loop thread, so counters need no locks.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ragserve.config import Config
from ragserve.errors import AdmissionRejected
from ragserve.runtime import Runtime
from ragserve.server.metrics import ServerMetrics


class Slot:
    """One admitted request; `release` (idempotent) frees it. Usable as a context manager."""

    def __init__(self, admission: "Admission") -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Admission:
    """A bounded count of requests in flight (running or waiting); beyond it, reject.

    The bound is what keeps a burst from piling up: a rejected client gets 503 with
    Retry-After at once instead of a queue slot, so memory stays bounded.
    """

    def __init__(self, what: str, limit: int, retry_after_s: float) -> None:
        self.what = what
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.num_rejected = 0

    def acquire(self) -> Slot:
        """A slot, or AdmissionRejected when `limit` requests are already in flight."""
        if self.in_flight >= self.limit:
            self.num_rejected += 1
            raise AdmissionRejected(f"{self.in_flight} {self.what} in flight (limit {self.limit}); "
                                    f"retry after {self.retry_after_s:g} s", retry_after_s=self.retry_after_s)
        self.in_flight += 1
        return Slot(self)


@dataclass
class ServerState:
    config: Config
    runtime: Runtime | None = None         # set by the lifespan when not injected
    owns_runtime: bool = True              # close it at shutdown
    tokenizer: Any = None                  # the serving model's, for chunking at ingest
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    queries: Admission = field(init=False)
    ingests: Admission = field(init=False)
    damaged: dict[str, str] = field(default_factory=dict)   # collection -> why it does not load
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sc = self.config.server
        self.queries = Admission("queries", sc.max_queue, sc.retry_after_s)
        self.ingests = Admission("ingest requests", sc.max_ingest_queue, sc.retry_after_s)

    def admit(self, kind: str) -> Slot:
        """A slot for a "query" or an "ingest"; AdmissionRejected (503) when full."""
        admission = self.queries if kind == "query" else self.ingests
        try:
            return admission.acquire()
        except AdmissionRejected:
            self.metrics.rejected.labels(kind).inc()
            raise

    def check_collection(self, name: str) -> Any:
        """Open `name` (returns the collection) and record whether it loads in `damaged`;
        NotFound and CollectionDamaged propagate."""
        from ragserve.errors import CollectionDamaged, NotFound

        assert self.runtime is not None
        try:
            col = self.runtime.retriever.collection(name)
        except CollectionDamaged as exc:
            self.damaged[name] = str(exc)
            raise
        except NotFound:
            self.damaged.pop(name, None)
            raise
        self.damaged.pop(name, None)
        return col

    def collection_lock(self, name: str) -> asyncio.Lock:
        """Serializes writes (ingest, delete) to one collection within this server."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock
