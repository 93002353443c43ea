"""POST /v1/query: a question over a collection -> answer, plan, profile, chunks, timings.

With `stream: true` the answer comes as Server-Sent Events:

    event: plan    data: {"plan": {...}, "profile": {...}|null, "decision": {...}, "chunks": [...]}
    event: token   data: {"text": "piece"}          (repeated; the answer's pieces in order)
    event: done    data: <the same object as the non-streamed response>
    event: error   data: {"error": {...}}           (instead of done, if it failed mid-way)
"""
from __future__ import annotations

import logging
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ragserve.domain import QueryResult
from ragserve.errors import RagServeError
from ragserve.server.deps import QueryAuth, StateDep
from ragserve.server.errors import describe
from ragserve.server.querying import QueryArgs, open_stream, run_query, sse
from ragserve.server.schemas import QueryRequest, QueryResponse, planned_event, query_response, to_plan

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["query"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def args_of(body: QueryRequest) -> QueryArgs:
    return QueryArgs(body.query, body.collection, to_plan(body.plan), body.filters,
                     body.slo_ms / 1000 if body.slo_ms else None,
                     body.timeout_ms / 1000 if body.timeout_ms else None, body.steer, body.max_tokens)


@router.post("/query", response_model=QueryResponse, dependencies=[QueryAuth],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or Server-Sent Events with stream: true"}})
async def query(body: QueryRequest, request: Request, state: StateDep):
    args = args_of(body)
    if not body.stream:
        return query_response(await run_query(state, request, args))
    stream = await open_stream(state, request, args)

    async def events() -> AsyncIterator[str]:
        yield sse(planned_event(stream.planned), "plan")
        try:
            async for event in stream.events():
                if isinstance(event, QueryResult):
                    yield sse(query_response(event), "done")
                else:
                    yield sse({"text": event}, "token")
        except Exception as exc:   # the status line is sent: report in the stream
            logger.warning("stream of /v1/query failed: %s", exc, exc_info=not isinstance(exc, RagServeError))
            _, body, _ = describe(exc)
            yield sse(body, "error")

    return EventStream(events(), stream.close)


class EventStream(StreamingResponse):
    """An SSE response that always runs `on_close` when it ends, however it ends (done,
    client gone, server shutdown), so the query's slot and engine calls are released."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
