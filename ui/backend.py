"""Where the explorer's queries run: a ragserve server over HTTP, or the in-process controller.

Both backends yield the server's streamed events, `(name, body)` with name `plan`,
`token` or `done` (bodies as in ragserve/server/routes_query.py), so the views do not
care which one answers. Failures raise `BackendError` with a message for the user;
`BackendUnavailable` when the backend cannot be reached at all.

The in-process backend owns one asyncio loop in a daemon thread: the controller (and
METIS' scheduler) live on it, and Streamlit's script threads submit queries to it.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import httpx

Event = tuple[str, dict[str, Any]]
CONNECT_TIMEOUT_S = 3.0
QUERY_TIMEOUT_S = 600.0


class BackendError(Exception):
    """A query or request failed; the message says what to do."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (server down, wrong URL, engine not started)."""


@dataclass(frozen=True)
class LoadSample:
    """One snapshot of the engine's load."""

    t: float                   # wall clock, seconds since the epoch
    kv_used_tokens: int
    kv_capacity_tokens: int
    num_running: int           # engine calls in the running batch
    num_waiting: int           # engine calls queued for KV
    sched_waiting: int = 0     # queries waiting in METIS' scheduler for free KV


def largest_first(sizes: Iterable[tuple[str, int]]) -> list[str]:
    """Collection names by (name, number of chunks), most chunks first, then by name."""
    return [name for name, _ in sorted(sizes, key=lambda item: (-item[1], item[0]))]


class QueryBackend(Protocol):
    label: str

    def collections(self) -> list[str]:
        """Names of the collections queries can ask over, largest first (the pickers open on
        the first: a 1-chunk scratch collection is a poor default)."""
        ...

    def query_stream(self, question: str, collection: str, plan: str | None = None,
                     slo_ms: float | None = None, blend: bool = False) -> Iterator[Event]:
        """The query's events; `plan` None lets METIS choose; `blend` asks for CacheBlend."""
        ...

    def load(self) -> LoadSample:
        ...


def run_query(backend: QueryBackend, question: str, collection: str, plan: str | None = None,
              slo_ms: float | None = None, blend: bool = False,
              on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Drive a query to its `done` body, passing every event to `on_event`."""
    done: dict[str, Any] | None = None
    for event in backend.query_stream(question, collection, plan, slo_ms, blend):
        if on_event:
            on_event(event)
        if event[0] == "done":
            done = event[1]
    if done is None:
        raise BackendError("the query ended without an answer (no 'done' event)")
    return done


# ---------------------------------------------------------------------------- HTTP

def is_http_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase


def _sse(lines: Iterator[str]) -> Iterator[Event]:
    name, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class HttpBackend:
    """A running `ragserve serve`. `blend_url` is a second server started with blend.enabled
    (CacheBlend is a server setting, not a per-request one)."""

    def __init__(self, url: str, api_key: str | None = None, blend_url: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.blend_url = blend_url.rstrip("/") if blend_url else None
        self.label = f"server {self.url}"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _down(self, url: str, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"Cannot reach the ragserve server at {url} ({type(exc).__name__}: {exc}). Start it with "
            f"`ragserve serve --port {httpx.URL(url).port or 8000}`, fix the server URL in the sidebar, "
            "or switch to the in-process controller.")

    def _get(self, path: str, url: str | None = None) -> dict[str, Any]:
        base = url or self.url
        try:
            response = httpx.get(base + path, headers=self._headers,
                                 timeout=httpx.Timeout(30.0, connect=CONNECT_TIMEOUT_S))
        except httpx.TransportError as exc:
            raise self._down(base, exc) from None
        if response.status_code != 200:
            raise BackendError(f"{base}{path} answered {response.status_code}: {_error_message(response)}")
        return response.json()

    def ready(self) -> str:
        """'ready', or why not; raises BackendUnavailable when nothing answers."""
        try:
            return str(self._get("/readyz").get("status", "ready"))
        except BackendUnavailable:
            raise
        except BackendError as exc:
            return str(exc)

    def collections(self) -> list[str]:
        listed = self._get("/v1/collections").get("collections", [])
        usable = [c for c in listed if c.get("status", "ok") == "ok"]   # a damaged one cannot answer
        return largest_first((c["name"], int(c.get("num_chunks") or 0)) for c in usable)

    def query_stream(self, question: str, collection: str, plan: str | None = None,
                     slo_ms: float | None = None, blend: bool = False) -> Iterator[Event]:
        base = self.url
        if blend:
            if not self.blend_url:
                raise BackendError("CacheBlend is a server setting: start a second server with "
                                   "`blend: {enabled: true}` in its config and enter its URL as "
                                   "'CacheBlend server URL' in the sidebar.")
            base = self.blend_url
        body: dict[str, Any] = {"query": question, "collection": collection, "stream": True}
        if plan:
            body["plan"] = plan
        if slo_ms:
            body["slo_ms"] = slo_ms
        timeout = httpx.Timeout(QUERY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        try:
            with httpx.stream("POST", base + "/v1/query", json=body, headers=self._headers,
                              timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    raise BackendError(f"the server at {base} answered {response.status_code}: "
                                       f"{_error_message(response)}")
                for name, data in _sse(response.iter_lines()):
                    if name == "error":
                        message = data.get("error", {}).get("message", data)
                        raise BackendError(f"the query failed on {base}: {message}")
                    yield name, data
        except httpx.TransportError as exc:
            raise self._down(base, exc) from None

    def load(self) -> LoadSample:
        stats = self._get("/v1/stats")
        engine = stats.get("engine") or {}
        return LoadSample(t=time.time(), kv_used_tokens=int(engine.get("kv_used_tokens", 0)),
                          kv_capacity_tokens=int(engine.get("kv_capacity_tokens", 0)),
                          num_running=int(engine.get("num_running", 0)),
                          num_waiting=int(engine.get("num_waiting", 0)),
                          sched_waiting=int((stats.get("scheduler") or {}).get("num_waiting", 0)))


# ---------------------------------------------------------------------------- in-process

ControllerFactory = Callable[[bool], Any]   # blend on? -> a Controller


class InProcessBackend:
    """The controller in this process. `controllers` maps blend on/off to a controller; a
    missing variant is built on first use by `factory` (a second engine, so it is lazy)."""

    label = "in-process controller"

    def __init__(self, controllers: dict[bool, Any], factory: ControllerFactory | None = None,
                 owned: list[Any] | None = None) -> None:
        self._controllers = dict(controllers)
        self._factory = factory
        self._owned = owned or []        # runtimes/engines to close with the backend
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ragserve-ui-loop", daemon=True)
        self._thread.start()

    def controller(self, blend: bool) -> Any:
        with self._lock:
            ctl = self._controllers.get(blend)
            if ctl is None:
                if self._factory is None:
                    raise BackendError(f"the in-process controller was started with CacheBlend "
                                       f"{'off' if blend else 'on'} and cannot switch it")
                ctl = self._controllers[blend] = self._factory(blend)
            return ctl

    def collections(self) -> list[str]:
        from ragserve.retrieval.base import open_store

        ctl = next(iter(self._controllers.values()), None)
        store = getattr(getattr(ctl, "retriever", None), "store", None)   # the controller's store
        return largest_first((store or open_store()).collection_sizes().items())

    def query_stream(self, question: str, collection: str, plan: str | None = None,
                     slo_ms: float | None = None, blend: bool = False) -> Iterator[Event]:
        import queue

        from ragserve.controller import Planned
        from ragserve.errors import RagServeError
        from ragserve.domain import RagPlan
        from ragserve.server.schemas import planned_event, query_response

        try:
            fixed = RagPlan.parse(plan) if plan else None
            controller = self.controller(blend)
        except (RagServeError, OSError) as exc:   # a bad plan, or the blend variant failed to load
            raise BackendError(str(exc)) from None
        events: queue.Queue = queue.Queue()

        async def produce() -> None:
            try:
                stream = controller.query_stream(question, collection, fixed, None,
                                                 slo_ms / 1000 if slo_ms else None)
                async with aclosing(stream) as items:
                    async for item in items:
                        if isinstance(item, Planned):
                            events.put(("plan", planned_event(item)))
                        elif isinstance(item, str):
                            events.put(("token", {"text": item}))
                        else:
                            events.put(("done", query_response(item)))
            except Exception as exc:   # handed to the script thread
                events.put(("error", exc))
            finally:
                events.put(None)

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while (item := events.get()) is not None:
                if item[0] == "error":
                    failure: Exception = item[1]
                    message = (str(failure) if isinstance(failure, RagServeError)
                               else f"{type(failure).__name__}: {failure}")
                    raise BackendError(f"the query failed: {message}")
                yield item
        finally:
            future.cancel()   # a rerun left early: stop the engine calls

    def load(self) -> LoadSample:
        ctl = self.controller(next(iter(self._controllers)))
        s = ctl.engine.stats()
        planner = getattr(ctl, "planner", None)
        waiting = planner.stats().num_waiting if planner is not None else 0
        return LoadSample(t=time.time(), kv_used_tokens=s.kv_used_tokens, kv_capacity_tokens=s.kv_capacity_tokens,
                          num_running=s.num_running, num_waiting=s.num_waiting, sched_waiting=waiting)

    def close(self) -> None:
        for item in self._owned:
            asyncio.run_coroutine_threadsafe(item.close(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def build_inprocess(config_path: str | None = None) -> InProcessBackend:
    """Engine + retriever + METIS from a config file (what `ragserve query` builds). The
    CacheBlend variant, when Compare asks for it, is a second runtime with blend flipped."""
    from dataclasses import replace

    from ragserve.config import Config
    from ragserve.runtime import build_runtime

    config = Config.load(config_path)
    runtime = build_runtime(config)
    owned: list[Any] = [runtime]

    def factory(blend: bool) -> Any:
        if config.engine.backend != "local":
            raise BackendError("CacheBlend on/off switches the embedded engine only; this config "
                               "uses engine.backend=vllm")
        variant = build_runtime(replace(config, blend=replace(config.blend, enabled=blend)))
        owned.append(variant)
        return variant.controller

    return InProcessBackend({config.blend.enabled: runtime.controller}, factory, owned)
