"""The tuned controller's decision rule: the best answer the engine can deliver now.

Who owns what: the quality model predicts each candidate plan's answer quality for this
query (from the query and what retrieval found); the cost model prices its KV and its
service time in the engine's measured seconds; the scheduler calls `choose` with the free
KV and the engine's backlog at the job's turn, and admits what it returns. Pure: no engine,
no event loop.

The rule, for one query whose turn it is:

1. candidates: plans whose KV budget fits the free KV and whose largest call fits the
   context (KV stays a hard constraint: the GPU regime, where it binds); none -> wait;
2. predicted completion of a candidate = backlog (work the engine holds ahead of it) +
   its own service time;
3. budget: the request's SLO, or without one the cheapest candidate's completion x `slack`;
   candidates over the budget are dropped (the cheapest always stays);
4. score = predicted quality - price x service seconds, where the price of a second grows
   with load: price = time_value x (1 + backlog / cheapest service). Idle, a second costs
   `time_value` of quality; with a backlog of k cheap queries every second of extra service
   delays them all, so it costs k+1 times as much and the rule degrades to cheaper plans
   instead of queueing;
5. the highest score wins; scores within `tie` go to the faster plan.

Reason: "quality" when the pick is what an idle engine would run, "load" when load made
it cheaper, "slo" when the SLO did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ragserve.config import TunedConfig
from ragserve.metis.cost import PlanCost
from ragserve.domain import RagPlan


@dataclass(frozen=True)
class Candidate:
    plan: RagPlan
    cost: PlanCost          # KV budget and est_latency_s (service seconds)
    quality: float          # predicted answer quality in 0-1


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str             # "quality" | "load" | "slo"
    completion_s: float     # predicted wait + service
    budget_s: float


def choose(candidates: Sequence[Candidate], *, free_kv_tokens: int, max_context: int,
           backlog_s: float, slo_left_s: float | None, rule: TunedConfig) -> Choice | None:
    """The plan to run now, or None when none fits the free KV (the query waits)."""
    fits = [c for c in candidates
            if c.cost.kv_budget_tokens <= free_kv_tokens and c.cost.max_call_tokens <= max_context]
    if not fits:
        return None
    pick, budget = _pick(fits, backlog_s, slo_left_s, rule)
    reason = "quality"
    if slo_left_s is not None and _pick(fits, backlog_s, None, rule)[0] is not pick:
        reason = "slo"
    elif _pick(fits, 0.0, None, rule)[0] is not pick:
        reason = "load"
    return Choice(pick, reason, backlog_s + pick.cost.est_latency_s, budget)


def _pick(fits: Sequence[Candidate], backlog_s: float, slo_left_s: float | None,
          rule: TunedConfig) -> tuple[Candidate, float]:
    cheapest = min(fits, key=lambda c: (c.cost.est_latency_s, -c.quality))
    base_s = max(cheapest.cost.est_latency_s, 1e-3)
    budget = slo_left_s if slo_left_s is not None else (backlog_s + base_s) * rule.slack
    inside = [c for c in fits if backlog_s + c.cost.est_latency_s <= budget] or [cheapest]
    price = rule.time_value * (1.0 + backlog_s / base_s)
    best = max(c.quality - price * c.cost.est_latency_s for c in inside)
    ties = [c for c in inside if c.quality - price * c.cost.est_latency_s >= best - rule.tie]
    return min(ties, key=lambda c: (c.cost.est_latency_s, -c.quality)), budget
