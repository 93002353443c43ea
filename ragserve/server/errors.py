"""HTTP errors: the server's own exceptions and the one handler that renders every error.

Every error body has one shape, OpenAI's, so the openai client and LangChain surface the
message: {"error": {"type", "message", "param", "code"}}. `param` names the offending
field of a 422. Status per exception (see ragserve.errors):

    BadInput, ConfigError, NoFeasiblePlan, validation -> 422    NotFound -> 404
    CollectionDamaged -> 409 (the message says how to roll back or re-ingest)
    Unauthorized -> 401   Forbidden -> 403   PayloadTooLarge -> 413   RequestTimedOut -> 504
    AdmissionRejected, EngineUnavailable -> 503 + Retry-After     EngineDead, other -> 500
"""
from __future__ import annotations

import logging
import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ragserve.errors import (AdmissionRejected, BadInput, CollectionDamaged, ConfigError, EngineDead, EngineUnavailable,
                             ModelNotAvailable, NoFeasiblePlan, NotFound, RagServeError)

logger = logging.getLogger(__name__)


class Unauthorized(RagServeError):
    """No API key was presented where one is needed (401)."""


class Forbidden(RagServeError):
    """The presented API key is not accepted (403)."""


class RequestTimedOut(RagServeError):
    """The query ran past server.request_timeout_s and was cancelled (504)."""


class ClientGone(RagServeError):
    """The client disconnected; its work was cancelled (499, never seen by the client)."""


# (exception class, status, error type), most specific first
_STATUS: tuple[tuple[type[RagServeError], int, str], ...] = (
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (CollectionDamaged, 409, "collection_damaged"),
    (BadInput, 422, "bad_input"),
    (ConfigError, 422, "bad_config"),
    (NoFeasiblePlan, 422, "no_feasible_plan"),
    (ClientGone, 499, "client_gone"),
    (AdmissionRejected, 503, "overloaded"),
    (EngineUnavailable, 503, "engine_unavailable"),
    (RequestTimedOut, 504, "timeout"),
    (EngineDead, 500, "engine_dead"),
    (ModelNotAvailable, 500, "model_not_available"),
)


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def error_body(kind: str, message: str, param: str | None = None, **extra) -> dict:
    return {"error": {"type": kind, "message": message, "param": param, "code": kind, **extra}}


def describe(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, body, headers) for any exception: shared by the handler and SSE error events."""
    if isinstance(exc, RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        if first.get("type") == "json_invalid":   # FastAPI puts the byte offset where a field goes
            where = next((x for x in first["loc"] if isinstance(x, int)), None)
            ctx = (exc.errors()[0].get("ctx") or {}).get("error")
            why = str(ctx) if ctx else first["msg"].removeprefix("Invalid JSON: ")
            at = f" at byte {where}" if where is not None else ""
            return 422, error_body("validation_error", f"the request body is not valid JSON{at} ({why}); "
                                   "send one JSON object", None, errors=errors), {}
        loc = [str(x) for x in first["loc"]]
        if loc and loc[0] in ("body", "path", "query", "header", "cookie"):   # where, not which field
            loc = loc[1:]
        field = ".".join(loc) or None
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        return 422, error_body("validation_error", message, field, errors=errors), {}
    if isinstance(exc, HTTPException) and exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:
        # FastAPI's answer to a body json.loads rejects with RecursionError: a 422 like any bad JSON
        return 422, error_body("validation_error", "the request body is not valid JSON (nested too "
                               "deeply or malformed); send one JSON object", None), {}
    if isinstance(exc, HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error")
        return exc.status_code, error_body(kind, str(exc.detail)), dict(exc.headers or {})
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            headers: dict[str, str] = {}
            if status == 503:
                retry = getattr(exc, "retry_after_s", 1.0)
                headers["Retry-After"] = str(max(1, math.ceil(retry)))
            if status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return status, error_body(kind, str(exc)), headers
    return 500, error_body("internal_error", "internal server error; see the server log"), {}


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: every error leaves the server through here."""
    status, body, headers = describe(exc)
    if status >= 500 and status not in (503, 504):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc,
                     exc_info=exc if status == 500 and not isinstance(exc, RagServeError) else None)
    return JSONResponse(body, status_code=status, headers=headers)
