"""Liveness, readiness, Prometheus metrics and a JSON stats snapshot."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from ragserve.errors import RagServeError
from ragserve.server.deps import StateDep
from ragserve.server.errors import error_body
from ragserve.server.state import ServerState

router = APIRouter(tags=["health"])


def engine_alive(engine: Any) -> bool:
    """The engine says it is alive (the embedded one: its worker thread runs) and answers stats()."""
    if not getattr(engine, "alive", True):
        return False
    try:
        engine.stats()
    except Exception:
        return False
    return True


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready (starting, stopping, engine down)"}})
async def readyz(state: StateDep):
    """Ready for queries: the model, embedder and tokenizer loaded (start-up warm-up done, not
    shutting down) and the engine running."""
    rt = state.runtime
    checks = {"loaded": state.ready, "engine": rt is not None and engine_alive(rt.engine)}
    if all(checks.values()):
        # A damaged collection does not make the server unready (the others still serve):
        # it is reported as "degraded" with the way out, rechecked on every probe.
        for name in list(state.damaged):
            try:
                state.check_collection(name)
            except RagServeError:
                pass
        if state.damaged:
            return {"status": "degraded", "checks": checks, "damaged_collections": dict(state.damaged)}
        return {"status": "ready", "checks": checks}
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    return JSONResponse({**error_body("not_ready", f"not ready: {failing}"), "checks": checks},
                        status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    rt = state.runtime
    body = state.metrics.render(rt.engine if rt else None, rt.planner if rt else None,
                                state.queries.in_flight, state.queries.limit)
    return Response(body, media_type=state.metrics.content_type)


@router.get("/v1/stats")
async def stats(state: StateDep) -> dict[str, Any]:
    return stats_snapshot(state)


def stats_snapshot(state: ServerState) -> dict[str, Any]:
    rt = state.runtime
    out: dict[str, Any] = {
        "uptime_s": round(time.time() - state.started_at, 1),
        "ready": state.ready,
        "model": state.config.engine.model,
        "queries": {"in_flight": state.queries.in_flight, "limit": state.queries.limit,
                    "rejected": state.queries.num_rejected,
                    "answered": state.metrics.num_queries},
        "ingests": {"in_flight": state.ingests.in_flight, "limit": state.ingests.limit,
                    "rejected": state.ingests.num_rejected},
    }
    if rt is not None:
        s = rt.engine.stats()
        out["engine"] = {"kv_capacity_tokens": s.kv_capacity_tokens, "kv_used_tokens": s.kv_used_tokens,
                         "kv_free_tokens": s.kv_free_tokens, "num_running": s.num_running,
                         "num_waiting": s.num_waiting}
        blend_stats = getattr(rt.engine, "blend_stats", None)   # the embedded engine's CacheBlend
        if blend_stats is not None:
            out["blend"] = blend_stats()
        if rt.planner is not None:
            p = rt.planner.stats()
            out["scheduler"] = {"num_waiting": p.num_waiting, "held_tokens": p.held_tokens,
                                "plans": p.plans, "reasons": p.reasons}
    out["cancelled"] = dict(state.metrics.num_cancelled)
    return out
