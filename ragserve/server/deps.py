"""Dependencies of the routes: the server state, API-key checks and collection names.

Keys arrive as `Authorization: Bearer KEY` (what the openai client sends) or `X-API-Key`.
Writes and deletes always need a key: with none configured they are refused, never open.
Queries need one only with server.require_key_for_queries; otherwise a presented key is
ignored (the openai client always sends one, often a placeholder).
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ragserve.runtime import Runtime
from ragserve.server.errors import Forbidden, Unauthorized
from ragserve.server.schemas import NAME_PATTERN
from ragserve.server.state import ServerState

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def get_state(request: Request) -> ServerState:
    return request.app.state.ragserve


def get_runtime(request: Request) -> Runtime:
    runtime = get_state(request).runtime
    assert runtime is not None, "routes run only after the lifespan built the runtime"
    return runtime


StateDep = Annotated[ServerState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CollectionPath = Annotated[str, Path(pattern=NAME_PATTERN, description="Collection name")]


def _check(state: ServerState, bearer: HTTPAuthorizationCredentials | None, header: str | None,
           action: str) -> None:
    key = header or (bearer.credentials if bearer else None)
    if not key:
        raise Unauthorized(f"{action} needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    keys = state.config.server.api_keys
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        hint = "" if keys else " (this server has no keys configured: set server.api_keys or RAGSERVE_API_KEYS)"
        raise Forbidden(f"the API key is not accepted for {action}{hint}")


def require_write_key(state: StateDep,
                      bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                      header: Annotated[str | None, Security(_header)]) -> None:
    _check(state, bearer, header, "writing or deleting")


def require_query_key(state: StateDep,
                      bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                      header: Annotated[str | None, Security(_header)]) -> None:
    if state.config.server.require_key_for_queries:
        _check(state, bearer, header, "querying")


WriteAuth = Depends(require_write_key)
QueryAuth = Depends(require_query_key)
