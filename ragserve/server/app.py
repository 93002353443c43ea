"""The FastAPI app: `create_app(config, runtime=None)` and `serve(config)`.

Lifespan: start-up builds the runtime (model, engine, METIS) unless one is injected, loads
the tokenizer and the embedder, then marks the server ready. On SIGTERM uvicorn stops
accepting, waits up to server.shutdown_timeout_s for in-flight requests (queries finish,
ingests reach their commit), then the shutdown half closes the runtime. Collections need
no flush: every acknowledged ingest was committed atomically before its response.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

import ragserve
from ragserve.config import Config
from ragserve.errors import ConfigError, RagServeError
from ragserve.runtime import Runtime
from ragserve.server import routes_collections, routes_health, routes_openai, routes_query
from ragserve.server.errors import handle_error
from ragserve.server.middleware import BodyLimit, RequestMetrics
from ragserve.server.schemas import IngestRequest
from ragserve.server.state import ServerState

logger = logging.getLogger(__name__)


def _warm_up(state: ServerState) -> None:
    """Load everything a first request would otherwise wait for (runs in a worker thread)."""
    from ragserve.engines.local.models import load_tokenizer
    from ragserve.runtime import build_runtime

    if state.runtime is None:
        state.runtime = build_runtime(state.config)
    if state.tokenizer is None:
        state.tokenizer = load_tokenizer(state.config.engine.model)
    state.runtime.retriever.embedder.encode_query("warm-up")
    _open_collections(state)


def _open_collections(state: ServerState) -> None:
    """Load every collection now (first queries do not wait for it) and report the ones
    that do not load: the server still serves the others."""
    from ragserve.errors import CollectionDamaged, NotFound
    from ragserve.retrieval.store import list_collections

    for name in list_collections():
        try:
            state.check_collection(name)
        except NotFound:
            continue
        except CollectionDamaged as exc:
            logger.error("%s", exc)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.ragserve
    await asyncio.to_thread(_warm_up, state)
    state.ready = True
    sc = state.config.server
    if not sc.api_keys:
        logger.warning("no API keys configured (server.api_keys / RAGSERVE_API_KEYS): ingest and "
                       "delete are refused")
    logger.info("ragserve ready: model %s, max_queue %d", state.config.engine.model, sc.max_queue)
    try:
        yield
    finally:
        state.ready = False
        logger.info("shutting down: %d queries and %d ingests still in flight",
                    state.queries.in_flight, state.ingests.in_flight)
        if state.owns_runtime and state.runtime is not None:
            await state.runtime.close()


def create_app(config: Config, runtime: Runtime | None = None) -> FastAPI:
    """The ASGI app. With `runtime`, the caller owns it (tests, embedding in another app)."""
    config = replace(config, server=config.server.with_env())
    state = ServerState(config, runtime=runtime, owns_runtime=runtime is None)
    app = FastAPI(title="ragserve", version=ragserve.__version__,
                  description="RAG serving controller: per-query plans (METIS), load-aware scheduling.",
                  lifespan=lifespan)
    app.state.ragserve = state
    for router in (routes_health.router, routes_collections.router, routes_query.router, routes_openai.router):
        app.include_router(router)
    for exc in (RagServeError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc, handle_error)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.openapi = lambda: _openapi(app)   # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the JSON body of ingest (its route reads JSON or multipart)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = IngestRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["IngestRequest"] = body
        app.openapi_schema = schema
    return app.openapi_schema


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound now: a busy port fails in milliseconds, not after the
    model has loaded. Raises ConfigError naming the address and what to change."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"server.host={host!r} does not resolve ({exc.strerror}); use an address "
                          "such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        what = "is in use by another process" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError(f"{host}:{port} {what}; choose another port with --port or server.port") from None
    sock.set_inheritable(True)
    return sock


def serve(config: Config) -> None:
    """Run the server until SIGTERM/SIGINT (uvicorn installs the handlers). The port is bound
    before anything loads; the model loads in the lifespan, before the socket accepts."""
    import uvicorn

    sock = bind(config.server.host, config.server.port)
    app = create_app(config)
    sc = app.state.ragserve.config.server
    uv = uvicorn.Config(app, host=sc.host, port=sc.port, timeout_graceful_shutdown=math.ceil(sc.shutdown_timeout_s),
                        limit_concurrency=sc.max_connections, access_log=sc.access_log, log_level="info",
                        proxy_headers=False, server_header=False)
    try:
        uvicorn.Server(uv).run(sockets=[sock])
    finally:
        sock.close()
