"""Request and response bodies of the HTTP API (pydantic, at the edge only).

Every string, list and number is bounded, so a 422 names the field before any work is
done. Limits that are settings (body size, queue) live in ServerConfig; the ones here are
part of the API's contract and appear in the OpenAPI schema.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from ragserve.controller import MAX_QUERY_CHARS, Planned
from ragserve.domain import Method, QueryResult, RagPlan, RetrievedChunk
from ragserve.errors import BadInput

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"   # = retrieval.store._NAME_RE: no path escape
MAX_DOCUMENTS = 1000          # documents per ingest request
MAX_TEXT_CHARS = 2_000_000    # characters per document
MAX_CHUNKS = 64               # num_chunks of a plan given by the client
MAX_SLO_MS = 600_000
MAX_MESSAGES = 256

CollectionName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Scalar = Union[Annotated[str, StringConstraints(max_length=1024)], int,
               Annotated[float, Field(allow_inf_nan=False)], bool, None]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
FilterValue = Union[Scalar, Annotated[list[Scalar], Field(max_length=64)]]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain some non-whitespace text")
    return value


# ---------------------------------------------------------------------------- collections

class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None, description="Stable document id; default: derived from the text, so re-posting the "
                          "same text is a no-op. Re-posting an id with new text replaces its chunks.")
    title: str = Field("", max_length=1024)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    metadata: dict[MetaKey, Scalar] = Field(default_factory=dict, max_length=32,
                                            description="Filterable fields copied onto every chunk.")

    _text = field_validator("text")(_not_blank)


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS)


class IngestResponse(BaseModel):
    collection: str
    document_ids: list[str]
    chunk_ids: list[str] = Field(description="Chunks of these documents now stored.")
    added: int
    skipped: int = Field(description="Chunks whose text the collection already held.")
    removed: int = Field(description="Stale chunks of re-posted documents that were replaced.")
    num_chunks_total: int
    elapsed_ms: float


class CollectionInfo(BaseModel):
    name: str
    status: Literal["ok", "damaged"] = Field(
        "ok", description="damaged: its files do not load; `error` says how to roll back or re-ingest.")
    error: str | None = None
    num_chunks: int | None = None
    num_documents: int | None = None
    generation: int | None = None
    embedding_model: str | None = None
    tokenizer: str | None = Field(None, description="The tokenizer chunk sizes are counted in (its name).")
    chunk_tokens: int | None = None
    chunk_overlap_tokens: int | None = None


class CollectionList(BaseModel):
    collections: list[CollectionInfo]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(4, ge=1, le=100)
    filters: dict[MetaKey, FilterValue] | None = Field(None, max_length=16)

    _query = field_validator("query")(_not_blank)


class ChunkOut(BaseModel):
    id: str
    doc_id: str
    title: str
    score: float
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    chunks: list[ChunkOut]
    retrieve_ms: float


# ---------------------------------------------------------------------------- queries

class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method
    num_chunks: int = Field(ge=1, le=MAX_CHUNKS)
    intermediate_tokens: int = Field(0, ge=0, le=1024)

    def to_plan(self) -> RagPlan:
        return RagPlan(self.method, self.num_chunks, self.intermediate_tokens)


PlanField = Annotated[
    Union[PlanIn, Annotated[str, StringConstraints(max_length=64)], None],
    Field(description="Fix the plan instead of letting METIS choose: {method, num_chunks, "
                      "intermediate_tokens} or 'METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS]'.")]


def to_plan(value: PlanIn | str | None) -> RagPlan | None:
    if value is None:
        return None
    if isinstance(value, PlanIn):
        return value.to_plan()
    plan = RagPlan.parse(value)
    if plan.num_chunks > MAX_CHUNKS:
        raise BadInput(f"plan {value!r}: num_chunks must be <= {MAX_CHUNKS}")
    return plan


def _check_plan(value: PlanIn | str | None) -> PlanIn | str | None:
    if isinstance(value, str):
        try:
            to_plan(value)
        except BadInput as exc:
            raise ValueError(str(exc)) from None
    return value


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    collection: CollectionName
    plan: PlanField = None
    slo_ms: float | None = Field(None, gt=0, le=MAX_SLO_MS, allow_inf_nan=False,
                                 description="End-to-end latency target; METIS picks cheaper plans to meet it.")
    filters: dict[MetaKey, FilterValue] | None = Field(None, max_length=16)
    timeout_ms: float | None = Field(None, gt=0, le=MAX_SLO_MS, allow_inf_nan=False,
                                     description="Cancel the query with 504 after this long "
                                                 "(at most server.request_timeout_s).")
    stream: bool = Field(False, description="Server-Sent Events: plan, then token pieces, then done.")
    steer: bool | None = Field(None, description="LLMSteer: attend more to the chunks' key tokens "
                                                 "(embedded engine); null = the server's steer config.")
    max_tokens: int | None = Field(None, ge=1, le=32768,
                                   description="Cap on the answer's tokens, at most the server's "
                                               "synthesis.answer_tokens; finish_reason says 'length' when hit.")

    _query = field_validator("query")(_not_blank)
    _plan = field_validator("plan")(_check_plan)


class PlanOut(BaseModel):
    method: str
    num_chunks: int
    intermediate_tokens: int


class QueryResponse(BaseModel):
    answer: str
    plan: PlanOut
    profile: dict[str, Any] | None = Field(description="METIS query profile; null for a given plan.")
    decision: dict[str, Any] = Field(description="How the plan was chosen (pruned space, reason, free KV).")
    chunks: list[ChunkOut]
    timings: dict[str, float] = Field(description="Seconds: retrieve, profile, queue, ttft, total.")
    tokens: dict[str, int]
    num_calls: int
    finish_reason: Literal["stop", "length"] = Field(
        "stop", description="length: the answer stopped at its token cap (max_tokens or synthesis.answer_tokens).")


# ---------------------------------------------------------------------------- bodies from results

def chunk_out(hit: RetrievedChunk) -> dict[str, Any]:
    return hit.to_dict()


def query_response(result: QueryResult) -> dict[str, Any]:
    return result.to_dict()   # the same shape `ragserve query --json` prints


def planned_event(planned: Planned) -> dict[str, Any]:
    return planned.to_dict()


# ---------------------------------------------------------------------------- OpenAI

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Annotated[str, StringConstraints(max_length=32)]
    text: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)],
                   Annotated[list[ContentPart], Field(max_length=64)], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request. `max_tokens`/`max_completion_tokens` cap the answer (at most the
    server's synthesis.answer_tokens). Decoding is greedy: `temperature` and `top_p` are
    accepted (clients send them by default) and ignored; the response names them under
    ragserve.ignored_params. Other OpenAI parameters are ignored the same way."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128,
                       description="rag:<collection>, or any name with the X-RAG-Collection header.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=1)
    plan: PlanField = None
    slo_ms: float | None = Field(None, gt=0, le=MAX_SLO_MS, allow_inf_nan=False)
    timeout_ms: float | None = Field(None, gt=0, le=MAX_SLO_MS, allow_inf_nan=False)

    _plan = field_validator("plan")(_check_plan)
