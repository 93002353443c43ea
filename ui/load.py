"""Engine load over time: `LoadMonitor` samples a backend's load in its own thread; `LoadRun`
keeps a few queries in flight so there is load to watch."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ui.backend import LoadSample, QueryBackend, run_query


class LoadMonitor:
    """Samples `backend.load()` every `interval_s` into a bounded history, in a daemon thread.
    A failed sample is remembered as `last_error`, and sampling goes on. The thread stops by
    itself when nobody read the samples for `idle_stop_s` (the tab was closed); the view
    starts it again."""

    def __init__(self, backend: QueryBackend, interval_s: float = 0.5, max_samples: int = 1200,
                 idle_stop_s: float = 120.0) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.idle_stop_s = idle_stop_s
        self._last_read = time.monotonic()
        self._samples: deque[LoadSample] = deque(maxlen=max_samples)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._last_read = time.monotonic()
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ragserve-ui-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def sample(self) -> LoadSample | None:
        try:
            s = self.backend.load()
        except Exception as exc:   # keep sampling; the view shows the error
            self.last_error = str(exc)
            return None
        self.last_error = None
        self._samples.append(s)
        return s

    def samples(self) -> list[LoadSample]:
        self._last_read = time.monotonic()
        return list(self._samples)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() - self._last_read < self.idle_stop_s:
            self.sample()
            self._stop.wait(self.interval_s)


class LoadRun:
    """Keeps `concurrency` queries in flight over `questions` (cycled `rounds` times)."""

    def __init__(self, backend: QueryBackend, questions: list[str], collection: str, plan: str | None,
                 concurrency: int, rounds: int = 1) -> None:
        self.total = len(questions) * rounds
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="ragserve-ui-load")
        for question in questions * rounds:
            self._pool.submit(self._one, backend, question, collection, plan)
        self._pool.shutdown(wait=False)

    def _one(self, backend: QueryBackend, question: str, collection: str, plan: str | None) -> None:
        try:
            run_query(backend, question, collection, plan)
        except Exception as exc:   # counted, shown in the view
            with self._lock:
                self.errors.append(str(exc))
        finally:
            with self._lock:
                self.done += 1

    @property
    def finished(self) -> bool:
        return self.done >= self.total
