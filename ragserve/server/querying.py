"""Running one query for a request: admission, timeout, client disconnect, metrics.

Shared by /v1/query and /v1/chat/completions. A query holds an admission slot from
arrival to its last event. It is cancelled (engine calls stop, the plan's KV reservation
is released by the controller's `finally`) when it runs past server.request_timeout_s
(504) or its client goes away:

* plain requests: a side task waits for the ASGI `http.disconnect` and cancels the query;
* streams: the query runs in a producer task (`QueryStream`); the response's end, however
  it ends (done, client gone: Starlette cancels the response), cancels the producer.

Errors before the first event (bad input, not found, overload) become HTTP statuses;
errors after it can only be reported in the stream.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from ragserve.controller import Planned, StreamEvent
from ragserve.domain import QueryResult, RagPlan
from ragserve.server.errors import ClientGone, RequestTimedOut
from ragserve.server.state import ServerState, Slot

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class QueryArgs:
    question: str
    collection: str
    plan: RagPlan | None = None
    filters: dict[str, Any] | None = None
    slo_s: float | None = None
    timeout_s: float | None = None      # the client's deadline, capped by server.request_timeout_s
    steer: bool | None = None           # LLMSteer; None = config.steer for the collection
    max_answer_tokens: int | None = None    # the client's cap, below synthesis.answer_tokens


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _timeout_s(state: ServerState, args: QueryArgs) -> float:
    limit = state.config.server.request_timeout_s
    return min(limit, args.timeout_s) if args.timeout_s else limit


def _timed_out(state: ServerState, timeout_s: float) -> RequestTimedOut:
    state.metrics.observe_cancel("timeout")
    return RequestTimedOut(f"the query ran longer than its timeout of {timeout_s:g} s and was cancelled "
                           f"(server.request_timeout_s={state.config.server.request_timeout_s:g})")


async def _bounded(state: ServerState, request: Request, work: Awaitable[T], timeout_s: float,
                   limit_s: float) -> T:
    """Await `work` as a task; cancel it on timeout or client disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, timeout_s),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)   # its cleanup runs before we answer
        if gone in done:
            state.metrics.observe_cancel("disconnect")
            raise ClientGone("the client disconnected; the query was cancelled")
        raise _timed_out(state, limit_s)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def run_query(state: ServerState, request: Request, args: QueryArgs) -> QueryResult:
    """Answer `args` (admission -> controller.query under timeout/disconnect) -> QueryResult."""
    assert state.runtime is not None
    controller = state.runtime.controller
    with state.admit("query"):
        timeout_s = _timeout_s(state, args)
        result = await _bounded(state, request, controller.query(
            args.question, args.collection, args.plan, args.filters, args.slo_s, steer=args.steer,
            max_answer_tokens=args.max_answer_tokens),
            timeout_s, timeout_s)
    state.metrics.observe_query(result)
    return result


_END = object()


class QueryStream:
    """A streamed query, run by a producer task of its own that feeds a queue.

    The producer owns the query and its admission slot: it stops at the deadline (504) or
    when `close` cancels it, and its cleanup (engine calls cancelled, plan reservation and
    slot released) runs in its own task, whatever happens to the response's task (Starlette
    cancels that one with a level-triggered cancel scope when the client leaves).
    """

    def __init__(self, state: ServerState, inner: AsyncIterator[StreamEvent], slot: Slot, timeout_s: float) -> None:
        self._state = state
        self._inner = inner
        self._slot = slot
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._timed_out = False
        self.planned: Planned | None = None     # set by open_stream
        self._task = asyncio.ensure_future(self._produce())
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        if not self._task.done():
            self._timed_out = True
            self._task.cancel()

    async def _produce(self) -> None:
        try:
            async with aclosing(self._inner) as events:
                async for event in events:
                    if isinstance(event, QueryResult):
                        self._state.metrics.observe_query(event)
                    self._queue.put_nowait(event)
        except asyncio.CancelledError:
            if self._timed_out:
                self._queue.put_nowait(_timed_out(self._state, self._timeout_s))
        except Exception as exc:   # handed to the consumer
            self._queue.put_nowait(exc)
        finally:
            self._timer.cancel()
            self._slot.release()
            self._queue.put_nowait(_END)

    async def next(self) -> StreamEvent | None:
        """The next event; None at the end; raises what the query raised."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)   # stay at the end
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def events(self) -> AsyncIterator[str | QueryResult]:
        while (event := await self.next()) is not None:
            assert not isinstance(event, Planned)
            yield event

    def close(self, cause: str | None = "disconnect") -> None:
        """Stop the query if it still runs (idempotent; cleanup happens in the producer);
        counts a cancellation for `cause`."""
        if not self._task.done():
            if cause and not self._timed_out:
                self._state.metrics.observe_cancel(cause)
            self._task.cancel()


async def open_stream(state: ServerState, request: Request, args: QueryArgs) -> QueryStream:
    """Start a streamed query and wait for its plan. Errors until then raise (HTTP statuses);
    the caller iterates `events()` and must `close()` the stream when its response ends."""
    assert state.runtime is not None
    timeout_s = _timeout_s(state, args)
    inner = state.runtime.controller.query_stream(args.question, args.collection, args.plan,
                                                  args.filters, args.slo_s, steer=args.steer,
                                                  max_answer_tokens=args.max_answer_tokens)
    stream = QueryStream(state, inner, state.admit("query"), timeout_s)
    try:
        first = await _bounded(state, request, stream.next(), timeout_s + 5.0, timeout_s)
    except BaseException:
        stream.close(cause=None)   # _bounded counted it
        raise
    assert isinstance(first, Planned)
    stream.planned = first
    return stream


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event; `data` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n"
