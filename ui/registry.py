"""Process-wide registry of backends, their load monitors and load runs.

Streamlit reruns the script on every interaction; backends, monitors and load runs must
outlive a rerun (and be shared by browser sessions), so they live here.
"""
from __future__ import annotations

import threading

from ui.backend import HttpBackend, InProcessBackend, QueryBackend, build_inprocess
from ui.load import LoadMonitor, LoadRun

_lock = threading.Lock()
_inprocess: InProcessBackend | None = None
_http: dict[tuple[str, str | None, str | None], HttpBackend] = {}
_monitors: dict[int, LoadMonitor] = {}
_load_runs: dict[int, LoadRun] = {}


def get_inprocess() -> InProcessBackend | None:
    return _inprocess


def set_inprocess(backend: InProcessBackend | None) -> None:
    """Install the in-process backend (tests install one built on their fixtures); the one
    it replaces stops being monitored."""
    global _inprocess
    with _lock:
        if _inprocess is not None and _inprocess is not backend:
            monitor = _monitors.pop(id(_inprocess), None)
            if monitor is not None:
                monitor.stop()
        _inprocess = backend


def start_inprocess(config_path: str | None) -> InProcessBackend:
    """The in-process backend, built on first call (loads the model: seconds to a minute)."""
    global _inprocess
    with _lock:
        if _inprocess is None:
            _inprocess = build_inprocess(config_path)
        return _inprocess


def http_backend(url: str, api_key: str | None = None, blend_url: str | None = None) -> HttpBackend:
    key = (url, api_key or None, blend_url or None)
    with _lock:
        if key not in _http:
            _http[key] = HttpBackend(url, api_key or None, blend_url or None)
        return _http[key]


def monitor_for(backend: QueryBackend) -> LoadMonitor:
    with _lock:
        monitor = _monitors.get(id(backend))
        if monitor is None or monitor.backend is not backend:
            monitor = _monitors[id(backend)] = LoadMonitor(backend)
        return monitor


def load_run_for(backend: QueryBackend) -> LoadRun | None:
    return _load_runs.get(id(backend))


def start_load_run(backend: QueryBackend, questions: list[str], collection: str, plan: str | None,
                   concurrency: int, rounds: int = 1) -> LoadRun:
    with _lock:
        run = _load_runs.get(id(backend))
        if run is not None and not run.finished:
            return run   # one at a time: a second click while it runs is a no-op
        run = _load_runs[id(backend)] = LoadRun(backend, questions, collection, plan, concurrency, rounds)
        return run
