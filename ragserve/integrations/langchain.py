"""LangChain integration: a retriever over a collection and a runnable that answers questions.

    retriever = RagServeRetriever(collection="docs")                       # in-process search
    retriever = RagServeRetriever(collection="docs", base_url=URL)         # via the server
    rag = RagServeQuery(collection="docs", base_url=URL)                   # POST /v1/query
    rag = RagServeQuery(collection="docs", controller=runtime.controller)  # in-process
    rag.invoke("Who founded it?")["answer"]

`RagServeQuery` takes a question (str) or {"query", "plan"?, "filters"?, "slo_ms"?} and
returns the /v1/query response body (answer, plan, profile, decision, chunks, timings,
tokens, num_calls), the same in both modes. For chat-style use, LangChain's `ChatOpenAI`
works against the server directly: base_url=URL + "/v1", model="rag:docs".
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional, Union
from urllib.parse import quote

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict

from ragserve.errors import (AdmissionRejected, BadInput, CollectionDamaged, EngineUnavailable, NotFound,
                             RagServeError)

QueryInput = Union[str, dict[str, Any]]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class AccessDenied(RagServeError, PermissionError):
    """The server wants an API key (401) or does not accept the one sent (403)."""


class RequestTooLarge(BadInput):
    """The request body is above the server's server.max_body_bytes (413)."""


def _raise_for(response: httpx.Response) -> None:
    """Map the server's JSON errors (their `type`, else the status) onto ragserve's exceptions."""
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        message, kind = str(error["message"]), str(error.get("type") or "")
    except Exception:
        message, kind = response.text[:500], ""
    status = response.status_code
    text = f"ragserve server answered {status}: {message}"
    retry_after = _retry_after_s(response)
    if kind == "overloaded":   # the server's queue is full: the request was never started
        raise AdmissionRejected(f"{text} (retry after {retry_after:g} s)", retry_after_s=retry_after)
    if status in (401, 403):
        raise AccessDenied(f"{text}; pass api_key= a key the server accepts (its server.api_keys "
                           "or RAGSERVE_API_KEYS)")
    if status == 413:
        raise RequestTooLarge(f"{text}; send fewer or smaller documents per request")
    if kind == "collection_damaged":
        raise CollectionDamaged(text)
    if status == 503:
        raise EngineUnavailable(f"{text} (retry after {retry_after:g} s)")
    cls = {404: NotFound, 422: BadInput}.get(status, RagServeError)
    raise cls(text)


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _collection_path(name: str) -> str:
    """The collection as one URL path segment: a name with '/', '?' or '#' must not change the route."""
    return quote(name, safe="")


def _document(chunk: dict[str, Any]) -> Document:
    meta = {**chunk.get("metadata", {}), "id": chunk["id"], "doc_id": chunk["doc_id"],
            "title": chunk.get("title", ""), "score": chunk["score"]}
    return Document(page_content=chunk["text"], metadata=meta, id=chunk["id"])


class RagServeRetriever(BaseRetriever):
    """Top-k chunks of a ragserve collection as LangChain Documents (metadata: id, doc_id,
    title, score and the chunk's own metadata). In-process by default (loads the embedder
    once); with `base_url`, asks the server's /v1/collections/{name}/search."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    collection: str
    k: int = 4
    filters: Optional[dict[str, Any]] = None
    base_url: Optional[str] = None
    api_key: Optional[str] = None
    timeout_s: float = 60.0
    retriever: Any = None
    """A `ragserve.retrieval.Retriever` to share (in-process mode); default: a new one."""

    def _local(self) -> Any:
        if self.retriever is None:
            from ragserve.retrieval import Embedder, Retriever

            self.retriever = Retriever(Embedder())
        return self.retriever

    def _search_local(self, query: str) -> list[Document]:
        r = self._local()
        col = r.collection(self.collection)
        hits, _ = r.retrieve(col, query, min(self.k, len(col)), self.filters)
        return [_document({"id": h.chunk.id, "doc_id": h.chunk.doc_id, "title": h.chunk.title,
                           "score": round(h.score, 4), "text": h.chunk.text, "metadata": h.chunk.metadata})
                for h in hits]

    def _request(self, query: str) -> tuple[str, dict[str, Any]]:
        url = f"{self.base_url.rstrip('/')}/v1/collections/{_collection_path(self.collection)}/search"
        return url, {"query": query, "k": self.k, "filters": self.filters}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                ) -> list[Document]:
        if self.base_url is None:
            return self._search_local(query)
        url, body = self._request(query)
        response = httpx.post(url, json=body, headers=_headers(self.api_key), timeout=self.timeout_s)
        _raise_for(response)
        return [_document(c) for c in response.json()["chunks"]]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
                                       ) -> list[Document]:
        if self.base_url is None:
            return await asyncio.to_thread(self._search_local, query)
        url, body = self._request(query)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.post(url, json=body, headers=_headers(self.api_key))
        _raise_for(response)
        return [_document(c) for c in response.json()["chunks"]]


class RagServeQuery(RunnableSerializable[QueryInput, dict[str, Any]]):
    """Answers a question over `collection` through the server (`base_url`) or an
    in-process `controller` (then use `ainvoke`, or `invoke` outside an event loop)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    collection: str
    base_url: Optional[str] = None
    api_key: Optional[str] = None
    plan: Optional[str] = None
    """Fixed plan 'METHOD:NUM_CHUNKS[:INTERMEDIATE]'; None lets METIS choose."""
    timeout_s: float = 300.0
    controller: Any = None

    def _body(self, value: QueryInput) -> dict[str, Any]:
        body: dict[str, Any] = {"query": value} if isinstance(value, str) else dict(value)
        if "question" in body and "query" not in body:
            body["query"] = body.pop("question")
        body.setdefault("collection", self.collection)
        if self.plan and "plan" not in body:
            body["plan"] = self.plan
        if self.controller is None and self.base_url is None:
            raise BadInput("RagServeQuery needs base_url (a ragserve server) or controller (in-process)")
        return body

    async def _answer_local(self, body: dict[str, Any]) -> dict[str, Any]:
        from ragserve.domain import RagPlan
        from ragserve.server.schemas import query_response

        plan = RagPlan.parse(body["plan"]) if isinstance(body.get("plan"), str) else None
        slo = body.get("slo_ms")
        result = await self.controller.query(body["query"], body["collection"], plan, body.get("filters"),
                                             slo / 1000 if slo else None)
        return query_response(result)

    def invoke(self, input: QueryInput, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        return self._call_with_config(self._invoke, input, config, run_type="chain")

    def _invoke(self, value: QueryInput) -> dict[str, Any]:
        body = self._body(value)
        if self.controller is not None:
            return asyncio.run(self._answer_local(body))
        response = httpx.post(f"{self.base_url.rstrip('/')}/v1/query", json=body,
                              headers=_headers(self.api_key), timeout=self.timeout_s)
        _raise_for(response)
        return response.json()

    async def ainvoke(self, input: QueryInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict[str, Any]:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="chain")

    async def _ainvoke(self, value: QueryInput) -> dict[str, Any]:
        body = self._body(value)
        if self.controller is not None:
            return await self._answer_local(body)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.post(f"{self.base_url.rstrip('/')}/v1/query", json=body,
                                         headers=_headers(self.api_key))
        _raise_for(response)
        return response.json()
