"""The production HTTP server (`ragserve serve`): FastAPI app over one Runtime.

Modules: `app` (create_app, lifespan, serve), `schemas` (bounded pydantic bodies), thin
routers `routes_collections` / `routes_query` / `routes_openai` / `routes_health`,
`deps` (state, API keys), `querying` (admission, timeout, disconnect, streaming),
`state`, `metrics` (Prometheus), `middleware` (body limit, request counts), `errors`
(the one handler; status per exception).

    POST   /v1/collections/{name}/documents   ingest JSON texts or multipart files (key)
    GET    /v1/collections[/{name}]           list, inspect
    DELETE /v1/collections/{name}             delete (key)
    POST   /v1/collections/{name}/search      retrieval only
    POST   /v1/query                          answer (+ SSE with stream: true)
    POST   /v1/chat/completions               OpenAI-compatible (model rag:NAME)
    GET    /v1/models, /v1/stats, /healthz, /readyz, /metrics
"""
from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:   # lazy: ragserve.server.schemas must not need FastAPI
    if name in __all__:
        from ragserve.server import app

        return getattr(app, name)
    raise AttributeError(name)
