"""A query's events -> what the views show: the decision, the stage timings, the chunks.

Both backends hand over the HTTP API's bodies (ragserve/server/schemas.py): the `plan`
event (`planned_event`) and the final `done` body (`query_response`) share the keys
`plan`, `profile`, `decision` and `chunks`. Pure: no Streamlit, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ragserve.domain import RagPlan

STAGES = ("retrieve", "profile", "queue", "prefill (TTFT)", "decode")

REASONS = {
    "fit": "fit: the largest pruned plan whose KV fits the engine's free memory",
    "slo": "slo: a smaller plan, because a larger one that fits would miss the latency SLO",
    "fallback": "fallback: no pruned plan fit the free KV (or met the SLO), so METIS fell back to "
                "its fallback method with as many chunks as fit",
}


@dataclass(frozen=True)
class ChunkUsed:
    id: str
    doc_id: str
    title: str
    score: float
    text: str


@dataclass(frozen=True)
class PlanInfo:
    """How the plan was chosen (METIS) or that it was given."""

    plan: str
    profile: dict[str, Any] | None      # None when the request fixed the plan
    pruned: tuple[str, ...]             # METIS' pruned plan space
    fallback: str | None                # the fallback method of that space
    from_history: bool                  # low profiler confidence: union of recent spaces
    reason: str | None                  # fit | slo | fallback; None for a given plan
    kv_free_tokens: int | None          # free KV at admission
    est_latency_s: float | None         # the cost model's estimate for the chosen plan
    chunks: tuple[ChunkUsed, ...]


@dataclass(frozen=True)
class QueryOutcome:
    question: str
    answer: str
    info: PlanInfo
    timings: dict[str, float]           # seconds: retrieve_s, profile_s, queue_s, ttft_s, total_s
    prompt_tokens: int
    output_tokens: int
    num_calls: int
    label: str = ""                     # which side of a comparison, or the backend


def plan_str(plan: Mapping[str, Any]) -> str:
    """METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS] of a response's plan object ("?" without one)."""
    return str(RagPlan.from_dict(dict(plan))) if plan else "?"


def plan_info(body: Mapping[str, Any]) -> PlanInfo:
    """From a `plan` event or a `done` body."""
    decision = body.get("decision") or {}
    cost = decision.get("cost") or {}
    chunks = tuple(ChunkUsed(str(c.get("id", "")), str(c.get("doc_id", "")), str(c.get("title", "")),
                             float(c.get("score", 0.0)), str(c.get("text", "")))
                   for c in body.get("chunks") or ())
    return PlanInfo(plan=plan_str(body.get("plan") or {}), profile=body.get("profile"),
                    pruned=tuple(plan_str(p) for p in decision.get("pruned") or ()),
                    fallback=decision.get("fallback"), from_history=bool(decision.get("from_history")),
                    reason=decision.get("reason"), kv_free_tokens=decision.get("kv_free_tokens"),
                    est_latency_s=cost.get("est_latency_s"), chunks=chunks)


def outcome(question: str, body: Mapping[str, Any], label: str = "") -> QueryOutcome:
    """From a `done` body (the non-streamed /v1/query response)."""
    tokens = body.get("tokens") or {}
    return QueryOutcome(question=question, answer=str(body.get("answer", "")), info=plan_info(body),
                        timings={k: float(v) for k, v in (body.get("timings") or {}).items()},
                        prompt_tokens=int(tokens.get("prompt", 0)), output_tokens=int(tokens.get("output", 0)),
                        num_calls=int(body.get("num_calls", 0)), label=label)


def stage_breakdown(timings: Mapping[str, float]) -> list[tuple[str, float]]:
    """The query's end-to-end time split into consecutive stages, in seconds.

    The controller's `ttft_s` runs from the query's start to the answer's first token, so it
    holds retrieval, profiling and queueing: prefill is what remains of it. Decode is the
    rest of `total_s`. Negative remainders (clock jitter) are clamped to 0.
    """
    retrieve = timings.get("retrieve_s", 0.0)
    profile = timings.get("profile_s", 0.0)
    queue = timings.get("queue_s", 0.0)
    ttft = timings.get("ttft_s", 0.0)
    total = timings.get("total_s", 0.0)
    prefill = max(0.0, ttft - retrieve - profile - queue)
    decode = max(0.0, total - max(ttft, retrieve + profile + queue))
    return list(zip(STAGES, (retrieve, profile, queue, prefill, decode)))


def explain(info: PlanInfo) -> str:
    """One sentence on why the query ran with its plan."""
    if info.reason is None:
        return f"{info.plan} was fixed by the request; METIS did not choose."
    why = REASONS.get(info.reason, info.reason)
    free = f" ({info.kv_free_tokens:,} free KV tokens at admission)" if info.kv_free_tokens is not None else ""
    history = (" The profiler's confidence was low, so the space is the union of recent pruned spaces."
               if info.from_history else "")
    return f"METIS chose {info.plan} — {why}{free}.{history}"


def profile_rows(profile: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(dimension, value) pairs of a METIS query profile, for a small table."""
    if not profile:
        return []
    order = ("complexity", "joint_reasoning", "pieces", "summary_range", "confidence", "source")
    keys = [k for k in order if k in profile] + sorted(k for k in profile if k not in order)
    return [(k, _text(profile[k])) for k in keys]


def _text(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "–".join(str(v) for v in value)
    return str(value)
