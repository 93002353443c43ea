"""Dataclasses that cross module boundaries.

Data flow: retrieval returns `RetrievedChunk`s; the planner proposes `RagPlan`s; a
synthesis program turns (question, chunks, plan) into `LLMCall`s that an engine runs,
returning `LLMResult`s; the controller wraps everything in a `QueryResult`.
Engines report load as an `EngineStats` snapshot, which is all the scheduler sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping


class Method(str, Enum):
    """Synthesis method: how retrieved chunks are turned into an answer."""

    STUFF = "stuff"            # one call over all chunks
    MAP_RERANK = "map_rerank"  # one call per chunk with a confidence; keep the best
    MAP_REDUCE = "map_reduce"  # per-chunk summaries, then one answer call
    REFINE = "refine"          # sequential refinement over chunks

    @classmethod
    def parse(cls, value: str) -> "Method":
        try:
            return cls(value.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown synthesis method {value!r}; choose one of: {names}") from None


@dataclass(frozen=True, order=True)
class RagPlan:
    """One per-query choice of how to answer (a METIS 'configuration')."""

    method: Method
    num_chunks: int
    # Cap on each intermediate summary (map_reduce) or refined answer (refine), in tokens.
    intermediate_tokens: int = 0

    def __str__(self) -> str:
        tail = f":{self.intermediate_tokens}" if self.intermediate_tokens else ""
        return f"{self.method.value}:{self.num_chunks}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method.value, "num_chunks": self.num_chunks,
                "intermediate_tokens": self.intermediate_tokens}


@dataclass(frozen=True)
class Chunk:
    """A stored piece of a document, the unit of retrieval and of KV reuse."""

    id: str                 # stable: "<doc_id>#<n>"
    doc_id: str             # the source document (file path or corpus id)
    text: str
    num_tokens: int         # in the serving model's tokenizer, counted at ingest
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class RetrievedChunk:
    chunk: Chunk
    score: float            # cosine similarity, higher is closer


@dataclass(frozen=True)
class LLMCall:
    """One generation request. `messages` are chat turns; the engine applies its template."""

    messages: tuple[tuple[str, str], ...]   # ((role, content), ...)
    max_tokens: int
    temperature: float = 0.0                # 0 = greedy
    stop: tuple[str, ...] = ()
    logprobs: bool = False                  # return per-token log-probs (profiler confidence)
    # Chunks whose text appears verbatim in the last user message, in order: lets an
    # engine reuse their precomputed KV (CacheBlend). Ignored by engines that can't.
    chunk_ids: tuple[str, ...] = ()
    # The collection the chunks come from: lets an engine apply per-collection settings
    # (CacheBlend's gate verdict). "" = unknown.
    collection: str = ""
    tag: str = ""                           # what the call is for ("map", "reduce", ...), for logs
    # LLMSteer: attend more to the chunks' query-independent key tokens. None = the engine's
    # default (steer.enabled); engines that can't steer ignore it.
    steer: bool | None = None


@dataclass(frozen=True)
class LLMResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float           # submit -> first token, including time waiting for KV
    total_s: float          # submit -> last token
    queue_s: float = 0.0    # submit -> admitted into a running batch
    token_logprobs: tuple[float, ...] = ()
    finish_reason: str = "stop"   # "stop" | "length"


@dataclass(frozen=True)
class EngineSpeeds:
    """Measured speed of an engine, carried in `EngineStats.speeds`: the cost model's only time
    input. Model (continuous batching on one device):

        prefill_s(tokens)    = tokens / prefill_tok_s
        decode_step_s(batch) = step_base_s + step_per_row_s * (batch - 1)
        output tokens of a call with tag t = the recent mean of that tag's calls, capped by
        its max_tokens (answers run far below their cap: squad ~8 of 64 tokens)
    """

    prefill_tok_s: float            # prompt tokens per second (batched prefill, recent mean)
    step_base_s: float              # one decode step at batch 1
    step_per_row_s: float           # what each further row in the batch adds to a step
    num_prefills: int = 0           # measurements behind the figures (0 = the prior)
    num_steps: int = 0
    # Mean output tokens per call tag ("answer", "map", "reduce", ...), measured.
    output_tokens: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prefill_tok_s <= 0 or self.step_base_s <= 0 or self.step_per_row_s < 0:
            raise ValueError(f"speeds prefill_tok_s={self.prefill_tok_s} step_base_s={self.step_base_s} "
                             f"step_per_row_s={self.step_per_row_s}: rates must be > 0, the slope >= 0")

    def prefill_s(self, tokens: float) -> float:
        return tokens / self.prefill_tok_s

    def decode_step_s(self, batch: float) -> float:
        return self.step_base_s + self.step_per_row_s * max(0.0, batch - 1)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of one call decoding alone."""
        return 1.0 / self.step_base_s

    def expected_output(self, tag: str, cap: int) -> float:
        """Expected output tokens of a call with `tag` and `max_tokens=cap` (the cap when
        nothing was measured for that tag)."""
        mean = self.output_tokens.get(tag)
        return float(cap) if mean is None else min(float(cap), max(1.0, mean))

    def to_dict(self) -> dict[str, Any]:
        return {"prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_tok_s": round(self.decode_tok_s, 3),
                "step_base_s": round(self.step_base_s, 5), "step_per_row_s": round(self.step_per_row_s, 5),
                "num_prefills": self.num_prefills, "num_steps": self.num_steps,
                "output_tokens": {k: round(v, 2) for k, v in sorted(self.output_tokens.items())}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "EngineSpeeds":
        return cls(prefill_tok_s=float(raw["prefill_tok_s"]), step_base_s=float(raw["step_base_s"]),
                   step_per_row_s=float(raw["step_per_row_s"]), num_prefills=int(raw.get("num_prefills", 0)),
                   num_steps=int(raw.get("num_steps", 0)),
                   output_tokens={str(k): float(v) for k, v in (raw.get("output_tokens") or {}).items()})


@dataclass(frozen=True)
class EngineStats:
    """A load snapshot. The embedded engine and vLLM (from /metrics) fill the same one."""

    kv_capacity_tokens: int   # total KV slots the engine can hold
    kv_used_tokens: int       # slots held by running calls (reserved: prompt + max_tokens)
    num_running: int          # calls in the running batch
    num_waiting: int          # calls queued for KV
    kv_bytes_per_token: int = 0
    age_s: float = 0.0        # staleness of the snapshot (scraped engines)
    speeds: EngineSpeeds | None = None   # measured speed; None = not measured (priors apply)
    # Work the engine already holds, for "load in time": prompt tokens still to prefill
    # (waiting + admitted but not yet prefilled), and decode steps left for the running batch
    # at the calls' expected output lengths (the longest running call decides).
    queued_prefill_tokens: int = 0
    decode_steps_left: int = 0

    @property
    def kv_free_tokens(self) -> int:
        return max(0, self.kv_capacity_tokens - self.kv_used_tokens)


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about the serving model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Timings:
    retrieve_s: float = 0.0
    profile_s: float = 0.0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class QueryResult:
    question: str
    answer: str
    plan: RagPlan
    chunks: tuple[RetrievedChunk, ...]
    timings: Timings
    prompt_tokens: int
    output_tokens: int
    num_calls: int
    decision: dict[str, Any] = field(default_factory=dict)  # profile/pruned/reason (METIS)
    finish_reason: str = "stop"   # "length": the answer stopped at its token cap

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.answer,
            "plan": self.plan.to_dict(),
            "chunks": [{"id": c.chunk.id, "doc_id": c.chunk.doc_id, "score": round(c.score, 4)}
                       for c in self.chunks],
            "timings": self.timings.to_dict(),
            "tokens": {"prompt": self.prompt_tokens, "output": self.output_tokens},
            "num_calls": self.num_calls,
        }
        out.update(self.decision)
        return out
