"""Dataclasses that cross module boundaries.

Data flow: retrieval returns `RetrievedChunk`s; the planner proposes `RagPlan`s; a
synthesis program turns (question, chunks, plan) into `LLMCall`s that an engine runs,
returning `LLMResult`s; the controller wraps everything in a `QueryResult`.
Engines report load as an `EngineStats` snapshot, which is all the scheduler sees.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from ragserve.errors import BadInput


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


_DIGITS = re.compile(r"[0-9]+")
MAX_INTERMEDIATE_TOKENS = 1024   # a summary or refined answer longer than this is an answer, not a step


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

    @classmethod
    def parse(cls, text: str) -> "RagPlan":
        """METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS], e.g. map_reduce:6:64 (`str(plan)` read back).
        Numbers are ASCII digits: int() would also read "٣" as 3."""
        parts = str(text).split(":")
        if len(parts) not in (2, 3):
            raise BadInput(f"plan {text!r} is not METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS] "
                           "(e.g. stuff:4, map_reduce:6:64)")
        try:
            method = Method.parse(parts[0])
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if not all(_DIGITS.fullmatch(p.strip()) for p in parts[1:]):
            raise BadInput(f"plan {text!r}: NUM_CHUNKS and INTERMEDIATE_TOKENS must be integers (digits 0-9)")
        numbers = [int(p) for p in parts[1:]]
        return cls.checked(method, numbers[0], numbers[1] if len(numbers) == 2 else 0, str(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RagPlan":
        """The inverse of `to_dict` (tuning profiles, result files)."""
        if not isinstance(raw, dict) or "method" not in raw or "num_chunks" not in raw:
            raise BadInput(f"plan {raw!r} needs method and num_chunks")
        try:
            method = Method.parse(str(raw["method"]))
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        values = [raw["num_chunks"], raw.get("intermediate_tokens") or 0]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise BadInput(f"plan {raw!r}: num_chunks and intermediate_tokens must be integers")
        return cls.checked(method, values[0], values[1], repr(raw))

    @classmethod
    def checked(cls, method: Method, num_chunks: int, intermediate_tokens: int = 0, what: str = "") -> "RagPlan":
        what = what or f"{method.value}:{num_chunks}:{intermediate_tokens}"
        if num_chunks < 1:
            raise BadInput(f"plan {what}: num_chunks must be >= 1, got {num_chunks}")
        if not 0 <= intermediate_tokens <= MAX_INTERMEDIATE_TOKENS:
            raise BadInput(f"plan {what}: intermediate_tokens must be in [0, {MAX_INTERMEDIATE_TOKENS}], "
                           f"got {intermediate_tokens}")
        return cls(method, num_chunks, intermediate_tokens)


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

    def to_dict(self) -> dict[str, Any]:
        c = self.chunk
        return {"id": c.id, "doc_id": c.doc_id, "title": c.title, "score": round(self.score, 4),
                "text": c.text, "metadata": c.metadata}


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk as a prompt shows it (prompts.format_passage adds its rank)."""

    chunk_id: str
    title: str
    text: str


@dataclass(frozen=True)
class PromptContext:
    """A call's last user message as structure: `head`, the passages in rank order, `tail`
    (prompts.render_context renders it). Engines that reuse chunk KV lay the prompt out from
    this instead of parsing the rendered text."""

    head: str                        # before the first passage, e.g. "Context:\n"
    passages: tuple[Passage, ...]
    tail: str                        # after the passages and their separator, e.g. "Question: ..."


@dataclass(frozen=True)
class LLMCall:
    """One generation request. `messages` are chat turns; the engine applies its template."""

    messages: tuple[tuple[str, str], ...]   # ((role, content), ...)
    max_tokens: int
    temperature: float = 0.0                # 0 = greedy
    stop: tuple[str, ...] = ()
    logprobs: bool = False                  # return per-token log-probs (profiler confidence)
    # The last user message as structure, when it holds passages: lets an engine reuse their
    # precomputed KV (CacheBlend, LMCache). Ignored by engines that can't.
    context: PromptContext | None = None
    # The collection the chunks come from: lets an engine apply per-collection settings
    # (CacheBlend's gate verdict). "" = unknown.
    collection: str = ""
    tag: str = ""                           # what the call is for ("map", "reduce", ...), for logs
    # LLMSteer: attend more to the chunks' query-independent key tokens. None = the engine's
    # default (steer.enabled); engines that can't steer ignore it.
    steer: bool | None = None

    @property
    def chunk_ids(self) -> tuple[str, ...]:
        """The chunks the call reads, in prompt order."""
        return tuple(p.chunk_id for p in self.context.passages) if self.context else ()


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
        a call's decode wall time = its steps + prefill_pause_s per step
    """

    prefill_tok_s: float            # prompt tokens per second (batched prefill, recent mean)
    step_base_s: float              # one decode step at batch 1
    step_per_row_s: float           # what each further row in the batch adds to a step
    num_prefills: int = 0           # measurements behind the figures (0 = the prior)
    num_steps: int = 0
    # Mean output tokens per call tag ("answer", "map", "reduce", ...), measured.
    output_tokens: Mapping[str, float] = field(default_factory=dict)
    # Recent calls' prefill pause per decode step: an engine that pauses its running batch for
    # every prefill it admits stretches each call's decode by the prefills admitted meanwhile.
    # 0 where the step times already include them (vLLM's are timed between a call's tokens).
    prefill_pause_s: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_tok_s <= 0 or self.step_base_s <= 0 or self.step_per_row_s < 0:
            raise ValueError(f"speeds prefill_tok_s={self.prefill_tok_s} step_base_s={self.step_base_s} "
                             f"step_per_row_s={self.step_per_row_s}: rates must be > 0, the slope >= 0")
        if self.prefill_pause_s < 0:
            raise ValueError(f"speeds prefill_pause_s={self.prefill_pause_s} must be >= 0")

    def prefill_s(self, tokens: float) -> float:
        return tokens / self.prefill_tok_s

    def decode_step_s(self, batch: float) -> float:
        return self.step_base_s + self.step_per_row_s * max(0.0, batch - 1)

    def decode_s(self, steps: float, batch: float) -> float:
        """Wall time of `steps` decode steps at `batch` rows, with the recent prefill pauses."""
        return steps * (self.decode_step_s(batch) + self.prefill_pause_s)

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
                "output_tokens": {k: round(v, 2) for k, v in sorted(self.output_tokens.items())},
                "prefill_pause_s": round(self.prefill_pause_s, 5)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "EngineSpeeds":
        return cls(prefill_tok_s=float(raw["prefill_tok_s"]), step_base_s=float(raw["step_base_s"]),
                   step_per_row_s=float(raw["step_per_row_s"]), num_prefills=int(raw.get("num_prefills", 0)),
                   num_steps=int(raw.get("num_steps", 0)),
                   output_tokens={str(k): float(v) for k, v in (raw.get("output_tokens") or {}).items()},
                   prefill_pause_s=float(raw.get("prefill_pause_s", 0.0)))


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
class PlanDecision:
    """What the planner decided for one query and why. `to_dict` is its one serializer: the
    plan/profile/decision part of every response (CLI --json, HTTP, the stream's plan event).
    A plan the caller fixed has only `plan`."""

    plan: RagPlan
    reason: str | None = None           # METIS: fit | slo | fallback; AdaptiveRAG*: max_quality | smallest
    profile: Any = None                 # the metis.profile.QueryProfile planned from; None for a given plan
    pruned: tuple[RagPlan, ...] = ()    # the candidates the rules offered
    fallback: Method | None = None      # METIS: the method run with fewer chunks when no candidate fits
    from_history: bool | None = None    # METIS: low confidence, the candidates are the recent union
    kv_free_tokens: int | None = None   # METIS: free KV seen at admission
    cost: Any = None                    # the chosen plan's metis.cost.PlanCost
    planner: str | None = None          # who chose: metis | tuned | adaptive; None for a given plan
    admission_s: float | None = None    # arrival -> admission by the planner's scheduler
    # The tuned controller (metis/tuned.py): each candidate's predicted quality, the engine's
    # work ahead of the query at admission, and the measured speed the plans were priced at.
    predicted_quality: Mapping[str, float] | None = None
    backlog_s: float | None = None
    speeds: EngineSpeeds | None = None
    blend: Mapping[str, Any] | None = None   # CacheBlend's gate for the collection (engine's blend_policy)

    def details(self) -> dict[str, Any]:
        """How the plan was chosen; empty for a given plan."""
        out: dict[str, Any] = {}
        if self.pruned:
            out["pruned"] = [p.to_dict() for p in self.pruned]
        if self.fallback is not None:
            out["fallback"] = self.fallback.value
        if self.from_history is not None:
            out["from_history"] = self.from_history
        if self.reason is not None:
            out["reason"] = self.reason
        if self.kv_free_tokens is not None:
            out["kv_free_tokens"] = self.kv_free_tokens
        if self.cost is not None:
            out["cost"] = self.cost.to_dict()
        if self.planner is not None:
            out["planner"] = self.planner
        if self.admission_s is not None:
            out["admission_s"] = round(self.admission_s, 4)
        if self.predicted_quality is not None:
            out["predicted_quality"] = {k: round(v, 4) for k, v in self.predicted_quality.items()}
        if self.backlog_s is not None:
            out["backlog_s"] = round(self.backlog_s, 3)
        if self.speeds is not None:
            out["speeds"] = self.speeds.to_dict()
        if self.blend is not None:
            out["blend"] = dict(self.blend)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "profile": self.profile.to_dict() if self.profile is not None else None,
                "decision": self.details()}


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
    decision: PlanDecision | None = None   # None = PlanDecision(plan): the plan was given
    finish_reason: str = "stop"   # "length": the answer stopped at its token cap

    def __post_init__(self) -> None:
        if self.decision is None:
            object.__setattr__(self, "decision", PlanDecision(self.plan))

    def to_dict(self) -> dict[str, Any]:
        """The one JSON shape of an answer: `ragserve query --json` prints it, the HTTP API
        returns it (server.schemas.QueryResponse documents it)."""
        return {"answer": self.answer, "finish_reason": self.finish_reason, **self.decision.to_dict(),
                "chunks": [c.to_dict() for c in self.chunks], "timings": self.timings.to_dict(),
                "tokens": {"prompt": self.prompt_tokens, "output": self.output_tokens},
                "num_calls": self.num_calls}
