"""Collections: ingest (JSON texts or multipart files), list, inspect, search, delete.

Ingest is CPU-bound (chunking, embeddings): it runs in a worker thread, one at a time per
collection, and answers only after the collection's atomic commit, so an acknowledged
ingest survives a crash. Document ids make it idempotent: re-posting the same documents
stores nothing new and returns the same ids.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import unicodedata
from pathlib import Path as FsPath
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ragserve.errors import BadInput, CollectionDamaged, NotFound
from ragserve.retrieval.chunking import CORPUS_SUFFIX, TEXT_SUFFIXES, Document, corpus_documents
from ragserve.retrieval.ingest import IngestReport, ingest_documents
from ragserve.retrieval.base import StoredCollection
from ragserve.retrieval.store import Collection
from ragserve.server.deps import CollectionPath, QueryAuth, RuntimeDep, StateDep, WriteAuth
from ragserve.server.schemas import (MAX_DOCUMENTS, CollectionInfo, CollectionList, IngestRequest,
                                     IngestResponse, SearchRequest, SearchResponse, chunk_out)
from ragserve.server.state import ServerState

router = APIRouter(prefix="/v1/collections", tags=["collections"])

MAX_FILES = 64
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {"files": {"type": "array", "maxItems": MAX_FILES,
                             "items": {"type": "string", "format": "binary"},
                             "description": ".txt/.md files (id = file name) or .jsonl corpora "
                                            "({id, title, text, ...} per line)"}},
}
INGEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/IngestRequest"}},
    "multipart/form-data": {"schema": MULTIPART_SCHEMA}}}}


def info(col: StoredCollection) -> dict[str, Any]:
    s = col.spec
    return {"name": col.name, "status": "ok", "num_chunks": len(col), "num_documents": col.num_documents,
            "generation": col.generation, "embedding_model": s.embedding_model,
            "tokenizer": _public_name(s.tokenizer), "chunk_tokens": s.chunk_tokens,
            "chunk_overlap_tokens": s.chunk_overlap_tokens}


def _public_name(tokenizer: str) -> str:
    """A tokenizer stored as a local folder is shown by its folder name: the server's file
    layout is not the client's business."""
    return FsPath(tokenizer).name if "/" in tokenizer or "\\" in tokenizer else tokenizer


@router.get("", response_model=CollectionList, dependencies=[QueryAuth])
async def list_all(state: StateDep, runtime: RuntimeDep):
    """Every collection; one whose files do not load is listed with status "damaged"."""
    out = []
    for name in runtime.retriever.store.list_collections():
        try:
            out.append(info(state.check_collection(name)))
        except NotFound:   # deleted meanwhile
            continue
        except CollectionDamaged as exc:
            out.append({"name": name, "status": "damaged", "error": str(exc)})
    return {"collections": out}


@router.get("/{name}", response_model=CollectionInfo, dependencies=[QueryAuth])
async def inspect(name: CollectionPath, runtime: RuntimeDep):
    return info(runtime.retriever.collection(name))


@router.delete("/{name}", status_code=204, dependencies=[WriteAuth])
async def delete(name: CollectionPath, state: StateDep):
    async with state.collection_lock(name):
        if state.runtime is not None:
            state.runtime.retriever.store.delete(name)
            state.runtime.retriever.forget(name)
        else:
            from ragserve.retrieval.base import open_store
            open_store(state.config.retrieval).delete(name)
        state.damaged.pop(name, None)
    return Response(status_code=204)


@router.post("/{name}/rollback", dependencies=[WriteAuth])
async def rollback(name: CollectionPath, state: StateDep) -> dict[str, Any]:
    """Switch the collection back to its previous stored generation (the latest is damaged,
    or the last ingest is to be undone); the newer generation is deleted."""
    async with state.collection_lock(name):
        left, now = await asyncio.to_thread(Collection.rollback, name)
    state.damaged.pop(name, None)
    return {"collection": name, "rolled_back_from": left, "generation": now}


@router.post("/{name}/search", response_model=SearchResponse, dependencies=[QueryAuth])
async def search(name: CollectionPath, body: SearchRequest, runtime: RuntimeDep):
    col = runtime.retriever.collection(name)
    hits, seconds = runtime.retriever.retrieve(col, body.query, min(body.k, len(col)), body.filters)
    return {"chunks": [chunk_out(h) for h in hits], "retrieve_ms": round(seconds * 1000, 3)}


@router.post("/{name}/documents", response_model=IngestResponse, dependencies=[WriteAuth],
             openapi_extra=INGEST_BODY)
async def ingest(name: CollectionPath, request: Request, state: StateDep):
    """Add documents: JSON `{"documents": [{id?, title?, text, metadata?}]}` or multipart
    `files` (.txt/.md: id = file name; .jsonl: one {id, title, text, ...} per line)."""
    with state.admit("ingest"):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            docs = await _documents_from_files(request)
        elif content_type in ("application/json", ""):
            docs = _documents_from_json(await request.body())
        else:
            raise BadInput(f"content type {content_type!r} is not accepted; send application/json "
                           "or multipart/form-data")
        async with state.collection_lock(name):
            report = await asyncio.to_thread(_ingest, state, docs, name)
    state.metrics.ingested_chunks.inc(report.added)
    return {"collection": name, "document_ids": list(report.document_ids), "chunk_ids": list(report.chunk_ids),
            "added": report.added, "skipped": report.skipped, "removed": report.removed,
            "num_chunks_total": report.num_chunks_total, "elapsed_ms": round(report.elapsed_s * 1000, 1)}


def _ingest(state: ServerState, docs: list[Document], name: str) -> IngestReport:
    assert state.runtime is not None
    return ingest_documents(docs, name, state.tokenizer, state.runtime.retriever.embedder,
                            state.config.retrieval, progress=False, source=f"an HTTP ingest into {name!r}",
                            store=state.runtime.retriever.store)


def _text_id(text: str) -> str:
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return "sha256:" + hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:24]


def _documents_from_json(raw: bytes) -> list[Document]:
    try:
        body = IngestRequest.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return [Document(id=d.id or _text_id(d.text), title=d.title, text=d.text, metadata=dict(d.metadata))
            for d in body.documents]


async def _documents_from_files(request: Request) -> list[Document]:
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    files = [f for key in ("files", "file") for f in form.getlist(key) if isinstance(f, UploadFile)]
    if not files:
        raise RequestValidationError([{"loc": ("body", "files"), "msg": "Field required: attach one or "
                                       "more .txt/.md/.jsonl files as 'files'", "type": "missing"}])
    docs: list[Document] = []
    for upload in files:
        filename = FsPath(upload.filename or "").name   # never a path: no escape
        suffix = FsPath(filename).suffix.lower()
        if not filename or suffix not in TEXT_SUFFIXES + (CORPUS_SUFFIX,):
            raise BadInput(f"file {upload.filename!r} is not .txt, .md or .jsonl")
        data = await upload.read()
        if suffix == CORPUS_SUFFIX:   # parsed in memory: errors name the client's file
            docs.extend(corpus_documents(io.BytesIO(data), filename, FsPath(filename).stem))
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise BadInput(f"file {filename!r} is not UTF-8 text (bad byte at offset {exc.start})") from None
            docs.append(Document(id=filename, title=FsPath(filename).stem, text=text))
    if len(docs) > MAX_DOCUMENTS:
        raise BadInput(f"{len(docs)} documents in one request, above the limit of {MAX_DOCUMENTS}; split it")
    return docs
