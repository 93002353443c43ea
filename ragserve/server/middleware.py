"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnects).

`BodyLimit` refuses bodies above server.max_body_bytes with 413: at once when
Content-Length says so, else when the streamed body crosses the limit. `RequestMetrics`
counts responses by method, route template and status.
"""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from ragserve.server.errors import error_body
from ragserve.server.metrics import ServerMetrics

Scope = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        message = (f"request body is larger than server.max_body_bytes={self.max_bytes}; "
                   "send less per request")
        try:
            too_big = length is not None and int(length) > self.max_bytes
        except ValueError:
            too_big = False
        if too_big:
            response = JSONResponse(error_body("payload_too_large", message), status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), path, str(status)).inc()
