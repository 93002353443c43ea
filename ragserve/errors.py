"""Error hierarchy. Every message names the offending value and says what to do.

Callers map these onto exit codes (CLI) or HTTP statuses (server):
BadInput/ConfigError -> 422/exit 2, NotFound -> 404, CollectionDamaged -> 409, AdmissionRejected -> 503 +
Retry-After, EngineUnavailable -> 503 (retryable), EngineDead -> 500.
"""
from __future__ import annotations


class RagServeError(Exception):
    """Base class: anything ragserve raises on purpose."""


class BadInput(RagServeError, ValueError):
    """A user-supplied value is invalid (query, plan, file, number out of range)."""


class ConfigError(RagServeError, ValueError):
    """A setting is invalid or unknown."""


class NotFound(RagServeError, KeyError):
    """A named thing (collection, model, dataset) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CollectionDamaged(RagServeError):
    """A collection's committed files do not load; the message names it and the way out
    (roll back to the previous generation, or delete and re-ingest)."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class ModelNotAvailable(RagServeError):
    """Model weights are missing or fail their checksum; the message names the package."""


class NoFeasiblePlan(RagServeError):
    """No plan, not even the fallback, can ever fit the engine's KV capacity."""


class AdmissionRejected(RagServeError):
    """The queue is full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(RagServeError):
    """The engine cannot be reached right now; the call may be retried."""


class EngineDead(RagServeError):
    """The engine failed in a way a retry will not fix."""
