"""OpenAI-compatible chat completions over a collection (works with the openai client and
LangChain's ChatOpenAI, streaming included).

The last user message is the question. The collection comes from the model name
(`rag:NAME`) or the `X-RAG-Collection` header. ragserve extensions go in the request body
(`plan`, `slo_ms`: the openai client's `extra_body`) and come back under the top-level
`ragserve` key (plan, profile, chunks, timings). GET /v1/models lists `rag:NAME` for every
collection.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Header, Request

from ragserve.controller import MAX_QUERY_CHARS
from ragserve.domain import QueryResult
from ragserve.errors import BadInput, RagServeError
from ragserve.retrieval.store import validate_name
from ragserve.server.deps import QueryAuth, StateDep
from ragserve.server.errors import describe
from ragserve.server.querying import QueryArgs, open_stream, run_query, sse
from ragserve.server.routes_query import EventStream
from ragserve.server.schemas import ChatCompletionRequest, planned_event, query_response, to_plan

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

MODEL_PREFIX = "rag:"


def _collection(model: str, header: str | None) -> str:
    if model.startswith(MODEL_PREFIX):
        name = model[len(MODEL_PREFIX):]
    elif header:
        name = header
    else:
        raise BadInput(f"model {model!r} names no collection: use model 'rag:<collection>' "
                       "or send the X-RAG-Collection header")
    return validate_name(name)


def _question(body: ChatCompletionRequest) -> str:
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise BadInput("messages hold no user message; the last user message is the question")
    question = users[-1].text()
    if not question.strip():
        raise BadInput("the last user message has no text")
    if len(question) > MAX_QUERY_CHARS:
        raise BadInput(f"the last user message is {len(question)} characters, above the limit of "
                       f"{MAX_QUERY_CHARS}")
    return question


def _usage(result: QueryResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
            "total_tokens": result.prompt_tokens + result.output_tokens}


@router.post("/chat/completions", dependencies=[QueryAuth],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "chat.completion, or chat.completion.chunk events with stream: true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           x_rag_collection: Annotated[str | None, Header(max_length=64)] = None):
    args = QueryArgs(_question(body), _collection(body.model, x_rag_collection), to_plan(body.plan),
                     None, body.slo_ms / 1000 if body.slo_ms else None,
                     body.timeout_ms / 1000 if body.timeout_ms else None,
                     max_answer_tokens=body.max_completion_tokens or body.max_tokens)
    ignored = _ignored_params(body)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        result = await run_query(state, request, args)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(result), "ragserve": {**query_response(result), "ignored_params": ignored}}

    stream = await open_stream(state, request, args)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": None}], **extra})

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, ragserve={"event": "plan", **planned_event(stream.planned)})
        try:
            async for event in stream.events():
                if isinstance(event, QueryResult):
                    yield chunk({}, event.finish_reason, ragserve={"event": "done", **query_response(event),
                                                                   "ignored_params": ignored})
                    if include_usage:
                        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": body.model, "choices": [], "usage": _usage(event)})
                else:
                    yield chunk({"content": event})
        except Exception as exc:   # the status line is sent: report in the stream
            logger.warning("stream of /v1/chat/completions failed: %s", exc, exc_info=not isinstance(exc, RagServeError))
            _, error, _ = describe(exc)
            yield sse(error)
        yield sse("[DONE]")

    return EventStream(events(), stream.close)


def _ignored_params(body: ChatCompletionRequest) -> list[str]:
    """The request's decoding and other OpenAI parameters this server does not apply."""
    extra = sorted(k for k in (body.model_extra or {}) if k not in _HARMLESS)
    return [k for k in ("temperature", "top_p") if getattr(body, k) is not None] + extra


# Sent by OpenAI clients by default; they change nothing a RAG answer would differ by.
_HARMLESS = frozenset({"user", "metadata", "store", "n"})


@router.get("/models", dependencies=[QueryAuth])
async def models(state: StateDep) -> dict[str, Any]:
    if state.runtime is not None:
        store = state.runtime.retriever.store
    else:
        from ragserve.retrieval.base import open_store
        store = open_store(state.config.retrieval)
    return {"object": "list", "data": [{"id": MODEL_PREFIX + name, "object": "model", "created": 0,
                                        "owned_by": "ragserve"} for name in store.list_collections()]}
