"""Scheduler: picks each waiting query's plan under the engine's current memory load and
admits it (METIS §4.3, best-fit).

Who owns what: the planner proposes candidate plans per query (a `Job`); the cost model
prices them; this module chooses one and decides *when* the query runs. It never imports
an engine: its caller (MetisPlanner) hands it a load snapshot each step. The loop is the planner's:

    scheduler.add(job)                        # a query arrives (may raise NoFeasiblePlan)
    for d in scheduler.schedule(engine.stats()):   # on arrival and whenever calls finish
        run d.job with d.plan                 # the controller submits the calls

Choice for one job, given the free KV tokens F left at its turn:

1. best fit: the candidate with the largest KV budget that fits F (and the model's context);
2. with a latency SLO: the largest candidate that fits F *and* whose estimated latency meets
   the time left (`slo_s - wait_s`); reason "slo" when the SLO ruled out a larger fit;
3. otherwise the fallback method (map_rerank without joint reasoning, stuff with it) with
   as many chunks as fit (and meet the SLO, if any), at most the candidates' largest count;
4. otherwise the job waits.

A job that carries predicted qualities (the tuned controller) is chosen by `ragserve.metis.decide` instead:
predicted quality against predicted completion (backlog + service seconds) over the
candidates that fit F; each admission adds its prefill to the backlog the next job sees.

Admissions consume F within the step, so two jobs never take the same free memory.
Order: FCFS stops at the first job that cannot run, so a large job at the head is never
starved by smaller ones behind it (they wait too). SJF orders by the job's smallest
possible cost (fallback with one chunk) and skips jobs that cannot run; it can starve
large jobs under sustained load. Across steps the snapshot must already count the calls of
jobs admitted earlier; if the caller cannot guarantee that, set `hold_until_release`
and call `release(job_id)` once the engine has taken the job's calls.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

from ragserve.config import MetisConfig, ServerConfig, TunedConfig
from ragserve.domain import EngineStats, Method, RagPlan
from ragserve.errors import AdmissionRejected, BadInput, ConfigError, NoFeasiblePlan
from ragserve.metis.cost import CostModel, PlanCost
from ragserve.metis.profile import QueryProfile
from ragserve.metis.rules import PlanSpace
from ragserve.metis.decide import Candidate, choose

logger = logging.getLogger(__name__)


class Policy(str, Enum):
    FCFS = "fcfs"   # arrival order; a blocked head blocks the queue
    SJF = "sjf"     # smallest possible cost first; blocked jobs are skipped


class Reason(str, Enum):
    FIT = "fit"              # the largest candidate that fits the free KV
    SLO = "slo"              # a smaller candidate: a larger fit would miss the latency SLO
    FALLBACK = "fallback"    # no candidate fits (or meets the SLO): fallback method, fewer chunks
    QUALITY = "quality"      # tuned: the best predicted quality for its time, as on an idle engine
    LOAD = "load"            # tuned: a cheaper plan than idle, because time is dear under load


@dataclass(frozen=True)
class SchedulerConfig:
    policy: Policy = Policy.FCFS
    """fcfs | sjf; see the module docstring for head-of-line behaviour."""
    max_waiting: int = MetisConfig.max_waiting
    """Jobs queued at most; `add` raises AdmissionRejected beyond (0 = unlimited)."""
    retry_after_s: float = ServerConfig.retry_after_s
    """Retry-After hint carried by AdmissionRejected."""
    hold_until_release: bool = False
    """Keep each admitted job's KV budget reserved until `release(job_id)`: for engines whose
    stats lag behind submission."""

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            try:
                object.__setattr__(self, "policy", Policy(str(self.policy).lower()))
            except ValueError:
                raise ConfigError(
                    f"scheduler policy {self.policy!r} unknown; use fcfs or sjf") from None
        if self.max_waiting < 0:
            raise ConfigError(f"scheduler max_waiting={self.max_waiting} must be >= 0")


@dataclass(frozen=True)
class Job:
    """One query waiting for a plan and admission."""

    id: str
    plans: tuple[RagPlan, ...]            # the planner's candidates (PlanSpace.plans)
    fallback: Method                      # PlanSpace.fallback
    chunk_token_counts: tuple[int, ...]   # retrieved chunks' token counts, in rank order
    question_tokens: int                  # the question in the serving model's tokens
    slo_s: float | None = None            # end-to-end latency target; None = best fit only
    arrival_s: float = field(default_factory=time.monotonic)   # time.monotonic() clock
    profile: QueryProfile | None = field(default=None, compare=False)   # for the log only
    qualities: tuple[float, ...] = ()     # predicted quality per plan (tuned rule); () = none
    blend_fraction: float | None = None   # share of stuff chunk tokens prefilled (the engine's blend
                                          # policy for the collection); None = the cost model's

    @classmethod
    def from_space(cls, job_id: str, space: PlanSpace, chunk_token_counts: Sequence[int],
                   question_tokens: int, *, slo_s: float | None = None,
                   arrival_s: float | None = None, blend_fraction: float | None = None) -> "Job":
        """A job for one query from the planner's output and the retrieved chunks."""
        return cls(job_id, space.plans, space.fallback, tuple(chunk_token_counts),
                   question_tokens, slo_s=slo_s,
                   arrival_s=time.monotonic() if arrival_s is None else arrival_s,
                   profile=space.profile, blend_fraction=blend_fraction)


@dataclass(frozen=True)
class Admitted:
    """A job admitted this step, with the plan to run."""

    job: Job
    plan: RagPlan
    reason: Reason
    kv_free_tokens: int   # free KV seen at this job's turn (after earlier admissions this step)
    cost: PlanCost        # the chosen plan's price; cost.kv_budget_tokens was taken from it
    wait_s: float         # arrival -> admission
    backlog_s: float = 0.0          # engine work ahead of it, in seconds (tuned rule)
    predicted_quality: float | None = None   # tuned rule: the chosen plan's predicted quality

    def to_dict(self) -> dict[str, Any]:
        out = {"plan": self.plan.to_dict(), "reason": self.reason.value,
               "kv_free_tokens": self.kv_free_tokens, "cost": self.cost.to_dict(),
               "wait_s": round(self.wait_s, 4)}
        if self.predicted_quality is not None:
            out.update(backlog_s=round(self.backlog_s, 3), predicted_quality=round(self.predicted_quality, 4))
        return out


@dataclass
class _Entry:
    """A waiting job with its candidates priced once at `add` (only free KV changes later)."""

    job: Job
    candidates: list[tuple[PlanCost, RagPlan]]   # largest KV budget first
    min_cost: PlanCost                           # the fallback with one chunk: the cheapest run
    max_fallback_chunks: int                     # "as many as fit", but no more than candidates use
    fallbacks: dict[int, PlanCost] = field(default_factory=dict)   # priced on demand, by chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig | None, cost_model: CostModel, *,
                 kv_capacity_tokens: int | None = None, rule: TunedConfig | None = None) -> None:
        """`kv_capacity_tokens`: the engine's total KV, if known before the first `schedule`
        (lets `add` reject a job that could never run); each snapshot updates it. `rule`: how jobs
        that carry predicted `qualities` are chosen (`ragserve.metis.decide`); jobs without them get
        METIS' best fit. Candidates are priced at `add` with `cost_model` as it is then: set a
        copy timed with the latest engine speeds (`CostModel.timed`) before adding."""
        self.config = config or SchedulerConfig()
        self.cost_model = cost_model
        self.rule = rule or TunedConfig()
        self.kv_capacity_tokens = kv_capacity_tokens   # learned from every stats snapshot
        self._waiting: dict[str, _Entry] = {}           # insertion order = arrival order
        self._held: dict[str, int] = {}                 # job id -> reserved KV (hold_until_release)
        self._infeasible: list[tuple[Job, NoFeasiblePlan]] = []
        self.plans_chosen: Counter[str] = Counter()     # by method
        self.reasons: Counter[str] = Counter()          # by reason

    # ------------------------------------------------------------------ queue

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, job: Job) -> None:
        """Queue `job`. Raises NoFeasiblePlan if even its fallback with one chunk can never
        run (larger than the model's context or the engine's total KV), AdmissionRejected if
        the queue is full."""
        if job.id in self._waiting:
            raise BadInput(f"job id {job.id!r} is already waiting")
        if not job.chunk_token_counts:
            raise BadInput(f"job {job.id!r} has no retrieved chunks to plan over")
        limit = self.config.max_waiting
        if limit and len(self._waiting) >= limit:
            raise AdmissionRejected(f"{len(self._waiting)} queries waiting (max_waiting={limit}); "
                                    "retry later", retry_after_s=self.config.retry_after_s)
        entry = self._price(job)
        error = self._never_fits(entry)
        if error is not None:
            raise error
        self._waiting[job.id] = entry

    def cancel(self, job_id: str) -> bool:
        """Drop a waiting job (client gone, timeout). False if it is not waiting."""
        return self._waiting.pop(job_id, None) is not None

    @property
    def held_tokens(self) -> int:
        """KV reserved by admitted jobs not yet released (hold_until_release)."""
        return sum(self._held.values())

    def release(self, job_id: str) -> None:
        """End the reservation of an admitted job (only with hold_until_release)."""
        self._held.pop(job_id, None)

    def take_infeasible(self) -> list[tuple[Job, NoFeasiblePlan]]:
        """Jobs dropped by `schedule` because the engine's capacity shrank below their
        smallest run; the planner fails them. Empties the list."""
        out, self._infeasible = self._infeasible, []
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        return {"plans": dict(self.plans_chosen), "reasons": dict(self.reasons)}

    # ------------------------------------------------------------------ step

    def schedule(self, stats: EngineStats, now_s: float | None = None) -> list[Admitted]:
        """Admit what fits `stats` now; returns the admitted jobs (possibly none).

        Called by the planner when a query arrives and whenever engine calls finish.
        Jobs that cannot run even with the fallback stay waiting.
        """
        now = time.monotonic() if now_s is None else now_s
        self.kv_capacity_tokens = stats.kv_capacity_tokens
        free = max(0, stats.kv_free_tokens - sum(self._held.values()))
        backlog_s = engine_backlog_s(stats)
        entries = list(self._waiting.values())
        if self.config.policy is Policy.SJF:
            entries.sort(key=lambda e: (e.min_cost.kv_budget_tokens, e.job.arrival_s))
        decisions: list[Admitted] = []
        for entry in entries:
            error = self._never_fits(entry)
            if error is not None:
                logger.warning("%s", error)
                del self._waiting[entry.job.id]
                self._infeasible.append((entry.job, error))
                continue
            if not entry.job.qualities:
                decision = self._decide(entry, free, now)
            else:
                decision = self._decide_tuned(entry, free, now, backlog_s)
            if decision is None:
                if self.config.policy is Policy.FCFS:
                    break
                continue
            free -= decision.cost.kv_budget_tokens
            if stats.speeds is not None:
                backlog_s += stats.speeds.prefill_s(decision.cost.prefill_tokens)
            del self._waiting[entry.job.id]
            if self.config.hold_until_release:
                self._held[entry.job.id] = decision.cost.kv_budget_tokens
            self._record(decision)
            decisions.append(decision)
        return decisions

    # ------------------------------------------------------------------ internals

    def _price(self, job: Job) -> _Entry:
        counts, q = job.chunk_token_counts, job.question_tokens
        max_context = self.cost_model.model.max_context
        one = RagPlan(job.fallback, 1)
        *costs, min_cost = self.cost_model.estimate_many(job.plans + (one,), counts, q,
                                                         blend_fraction=job.blend_fraction)
        candidates = [(c, p) for c, p in zip(costs, job.plans) if c.max_call_tokens <= max_context]
        # stable sort: equal budgets keep the planner's order
        candidates.sort(key=lambda cp: (cp[0].kv_budget_tokens, cp[0].est_latency_s), reverse=True)
        max_fallback = min(max((p.num_chunks for p in job.plans), default=len(counts)), len(counts))
        return _Entry(job, candidates, min_cost, max(1, max_fallback), {1: min_cost})

    def _never_fits(self, entry: _Entry) -> NoFeasiblePlan | None:
        need = entry.min_cost
        plan = f"{entry.job.fallback.value}:1"
        if need.max_call_tokens > self.cost_model.model.max_context:
            return NoFeasiblePlan(
                f"query {entry.job.id!r}: even {plan} needs a {need.max_call_tokens}-token call, "
                f"over the model's {self.cost_model.model.max_context}-token context; "
                "use smaller chunks or a shorter question")
        cap = self.kv_capacity_tokens
        if cap is not None and need.kv_budget_tokens > cap:
            return NoFeasiblePlan(
                f"query {entry.job.id!r}: even {plan} needs {need.kv_budget_tokens} KV tokens, "
                f"over the engine's total capacity of {cap}; raise the KV budget or use "
                "smaller chunks")
        return None

    def _decide(self, entry: _Entry, free: int, now: float) -> Admitted | None:
        job = entry.job
        wait_s = max(0.0, now - job.arrival_s)
        left_s = None if job.slo_s is None else job.slo_s - wait_s
        best_fit = next(((c, p) for c, p in entry.candidates if c.kv_budget_tokens <= free), None)
        if best_fit is not None and left_s is None:
            return Admitted(job, best_fit[1], Reason.FIT, free, best_fit[0], wait_s)
        if best_fit is not None:
            pick = next(((c, p) for c, p in entry.candidates
                         if c.kv_budget_tokens <= free and c.est_latency_s <= left_s), None)
            if pick is not None:
                reason = Reason.FIT if pick[1] == best_fit[1] else Reason.SLO
                return Admitted(job, pick[1], reason, free, pick[0], wait_s)
        fallback = self._largest_fallback(entry, free, left_s)
        if fallback is None and left_s is not None:
            fallback = self._largest_fallback(entry, free, None, max_chunks=1)   # SLO lost anyway
        if fallback is None:
            return None
        return Admitted(job, fallback[1], Reason.FALLBACK, free, fallback[0], wait_s)

    def _decide_tuned(self, entry: _Entry, free: int, now: float, backlog_s: float) -> Decision | None:
        job = entry.job
        wait_s = max(0.0, now - job.arrival_s)
        quality = dict(zip(job.plans, job.qualities))
        cands = [Candidate(p, c, quality.get(p, 0.0)) for c, p in entry.candidates]
        left_s = None if job.slo_s is None else job.slo_s - wait_s
        choice = choose(cands, free_kv_tokens=free, max_context=self.cost_model.model.max_context,
                        backlog_s=backlog_s, slo_left_s=left_s, rule=self.rule)
        if choice is None:
            return None
        c = choice.candidate
        return Admitted(job, c.plan, Reason(choice.reason), free, c.cost, wait_s, backlog_s, c.quality)

    def _largest_fallback(self, entry: _Entry, free: int, left_s: float | None,
                          max_chunks: int | None = None) -> tuple[PlanCost, RagPlan] | None:
        """Binary search for the most chunks whose fallback fits (cost grows with chunks)."""
        job = entry.job
        max_context = self.cost_model.model.max_context

        def cost(n: int) -> PlanCost:
            if n not in entry.fallbacks:
                entry.fallbacks[n] = self.cost_model.estimate(
                    RagPlan(job.fallback, n), job.chunk_token_counts, job.question_tokens,
                    blend_fraction=job.blend_fraction)
            return entry.fallbacks[n]

        def ok(n: int) -> bool:
            c = cost(n)
            return (c.kv_budget_tokens <= free and c.max_call_tokens <= max_context
                    and (left_s is None or c.est_latency_s <= left_s))

        if not ok(1):
            return None
        lo, hi = 1, entry.max_fallback_chunks if max_chunks is None else max_chunks
        while lo < hi:   # invariant: ok(lo)
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return cost(lo), RagPlan(job.fallback, lo)

    def _record(self, d: Admitted) -> None:
        self.plans_chosen[d.plan.method.value] += 1
        self.reasons[d.reason.value] += 1
        logger.info("decision job=%s profile=%s pruned=%d plan=%s reason=%s kv_free=%d "
                    "kv_need=%d calls=%d est_latency_s=%.2f wait_s=%.3f",
                    d.job.id, d.job.profile, len(d.job.plans), d.plan, d.reason.value,
                    d.kv_free_tokens, d.cost.kv_budget_tokens, d.cost.num_calls,
                    d.cost.est_latency_s, d.wait_s)



def engine_backlog_s(stats: EngineStats) -> float:
    """Seconds of work the engine holds ahead of a call submitted now: its queued prefills.
    Running calls decode alongside a new one (continuous batching), so they slow its steps
    (priced by the step time at the larger batch) but are not ahead of it. 0 without speeds."""
    if stats.speeds is None:
        return 0.0
    return stats.speeds.prefill_s(stats.queued_prefill_tokens)
