"""A discrete-event load simulator: a Poisson trace through the real scheduler and decision rule,
on an engine model with measured speeds, with per-(query, plan) quality from sweep records.

Why: a real evaluation at one arrival rate takes hours on a CPU; the rate curve (0.25-2x
capacity) and what-if engines (a GPU-like one where batching is nearly free and KV binds)
take seconds here. `ragserve eval` runs at a few rates validate it.

What is real and what is modelled:
- real: `Scheduler` (admission under free KV, FCFS queue, reservations held until the query
  ends), `CostModel` (timed with the engine speeds), `ragserve.metis.decide.choose` (the tuned
  rule), the quality predictions (cross-fitted: never trained on the query they plan), the
  qualities and token counts every plan got on every query (the sweep's records);
- modelled (`SimEngine`): the embedded engine's loop - admit calls FCFS under the KV budget
  (prompt + max_tokens reserved per call), prefill what was admitted (the running batch
  waits), then one decode step for the whole batch; times from `EngineSpeeds`, except the
  prefill pause per decode step and the output length per call tag, which it measures from
  its own calls as the embedded engine does. A call's prompt and output lengths are its
  record's (per call: the record's totals split over its calls).
"""
from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ragserve.config import TunedConfig
from ragserve.engines.speeds import MIN_SAMPLES, prefill_pause
from ragserve.eval.report import percentile
from ragserve.metis.cost import CostConfig, CostModel
from ragserve.domain import EngineSpeeds, EngineStats, Method, ModelSpec, RagPlan
from ragserve.metis.scheduler import Job, Policy, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class Outcome:
    """What one plan did on one query (a sweep record)."""

    quality: float
    prompt_tokens: int
    output_tokens: int
    num_calls: int


@dataclass(frozen=True)
class SimQuery:
    query_id: str
    chunk_tokens: tuple[int, ...]          # retrieved chunks' prompt tokens, rank order
    question_tokens: int
    outcomes: dict[RagPlan, Outcome]       # per plan of the grid
    predicted: dict[RagPlan, float] = field(default_factory=dict)   # cross-fitted quality


@dataclass
class _Call:
    prompt: int
    output: int
    reserve: int
    done: Callable[[float], None]
    tag: str = "stuff"
    produced: int = 0
    first_token_s: float = 0.0   # when its prefill ended
    steps_s: float = 0.0         # time of the decode steps it rode in


class SimEngine:
    """The embedded engine's step loop as a model (see the module docstring)."""

    def __init__(self, speeds: EngineSpeeds, kv_capacity_tokens: int, max_batch: int = 16) -> None:
        self.speeds = replace(speeds, prefill_pause_s=0.0)   # measured here, not given
        self._decodes: deque[tuple[float, float, int]] = deque(maxlen=256)   # (wall s, steps s, steps)
        self._outputs: dict[str, deque[int]] = {}   # per call tag, as SpeedTracker keeps them
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_batch = max_batch
        self.waiting: deque[_Call] = deque()
        self.running: list[_Call] = []
        self.kv_used = 0
        self.busy_until = 0.0
        self._prefilling = 0          # prompt tokens of the prefill in progress
        self._prefill_end = 0.0

    def submit(self, calls: Sequence[_Call]) -> None:
        self.waiting.extend(calls)

    def stats(self, now: float = 0.0) -> EngineStats:
        """As the embedded engine reports it at `now`: a prefill in progress counts as queued."""
        steps = max((c.output - c.produced for c in self.running), default=0)
        prefilling = self._prefilling if now < self._prefill_end else 0
        speeds = self.speeds
        if len(self._decodes) >= MIN_SAMPLES:
            speeds = replace(speeds, prefill_pause_s=prefill_pause(self._decodes))
        if self._outputs:
            speeds = replace(speeds, output_tokens={**speeds.output_tokens,
                                                    **{t: sum(v) / len(v) for t, v in self._outputs.items()}})
        return EngineStats(self.kv_capacity_tokens, self.kv_used, len(self.running), len(self.waiting),
                           speeds=speeds,
                           queued_prefill_tokens=prefilling + sum(c.prompt for c in self.waiting),
                           decode_steps_left=steps)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self, now: float) -> float:
        """One loop iteration starting at `now`; returns when it ends (calls finish then)."""
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            head = self.waiting[0]
            if self.kv_used + head.reserve > self.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.kv_used += head.reserve
            admitted.append(head)
        t = now
        if admitted:
            self._prefilling = sum(c.prompt for c in admitted)
            t += self.speeds.prefill_s(self._prefilling)
            self._prefill_end = t
            # the prefill samples the first token; `output` steps follow (the rest and the end
            # token, which the engine samples but does not count)
            for c in admitted:
                c.first_token_s = t
            self.running += admitted
        if self.running:
            step = self.speeds.decode_step_s(len(self.running))
            t += step
            for c in self.running:
                c.produced += 1
                c.steps_s += step
        done = [c for c in self.running if c.produced >= c.output]
        self.running = [c for c in self.running if c.produced < c.output]
        for c in done:
            self.kv_used -= c.reserve
            self._decodes.append((t - c.first_token_s, c.steps_s, c.produced))
            self._outputs.setdefault(c.tag, deque(maxlen=256)).append(c.output)
            c.done(t)
        return t


@dataclass(frozen=True)
class SimSystem:
    name: str                      # "fixed:stuff:2" | "metis" | "tuned"
    plan: RagPlan | None = None    # fixed plans only
    replay: bool = False           # each query runs the one plan it holds (what a real run chose)


@dataclass(frozen=True)
class SimSettings:
    speeds: EngineSpeeds
    kv_capacity_tokens: int
    model: ModelSpec
    answer_tokens: int = 64
    overhead_tokens_per_call: int = 60
    rule: TunedConfig = TunedConfig()
    max_batch: int = 16
    decision_overhead_s: float = 0.0   # per planned query (profiling, prediction)


@dataclass(frozen=True)
class SimRow:
    query_id: str
    plan: RagPlan
    quality: float
    arrival_s: float
    latency_s: float
    est_service_s: float | None = None   # predicted admission -> answer: engine backlog + the plan's price
    service_s: float | None = None       # admission -> answer


def _rounds(plan: RagPlan, o: Outcome, settings: SimSettings) -> list[list[tuple[int, int, int, str]]]:
    """The plan's engine submissions as rounds of (prompt, output, reserve, tag) per call; tags
    as `ragserve.synthesis` gives them, so outputs are measured per tag as the engines do."""
    n = max(1, o.num_calls)
    prompt, out = max(1, o.prompt_tokens // n), max(1, o.output_tokens // n)
    ans = settings.answer_tokens
    inter = plan.intermediate_tokens or ans
    if plan.method is Method.STUFF:
        return [[(o.prompt_tokens, max(1, o.output_tokens), o.prompt_tokens + ans, "stuff")]]
    if plan.method is Method.MAP_RERANK:
        return [[(prompt, out, prompt + ans, "map_rerank")] * n]
    if plan.method is Method.MAP_REDUCE:
        maps = n - 1 or 1
        return [[(prompt, out, prompt + inter, "map")] * maps, [(prompt, out, prompt + ans, "reduce")]]
    return [[(prompt, out, prompt + ans, "refine")] for _ in range(n)]


def simulate(queries: Sequence[SimQuery], system: SimSystem, rate_qps: float, settings: SimSettings,
             seed: int = 0, arrivals: Sequence[float] | None = None) -> list[SimRow]:
    """Replay a Poisson trace of `queries` (in order) at `rate_qps` through `system`, or the
    given `arrivals` (seconds, one per query: a real run's trace)."""
    if arrivals is None:
        rng = random.Random(f"sim:{seed}")
        arrivals, t = [], 0.0
        for _ in queries:
            t += rng.expovariate(rate_qps)
            arrivals.append(t)
    elif len(arrivals) != len(queries):
        raise ValueError(f"{len(arrivals)} arrivals for {len(queries)} queries")
    engine = SimEngine(settings.speeds, settings.kv_capacity_tokens, settings.max_batch)
    cost = CostModel(settings.model, CostConfig(answer_tokens=settings.answer_tokens,
                                                overhead_tokens_per_call=settings.overhead_tokens_per_call),
                     settings.speeds)
    scheduler = Scheduler(SchedulerConfig(policy=Policy.FCFS, max_waiting=0, hold_until_release=True), cost,
                          kv_capacity_tokens=settings.kv_capacity_tokens, rule=settings.rule)
    rows: list[SimRow] = []
    events: list[tuple[float, int, Callable[[float], None]]] = []
    seq = itertools.count()
    pending: dict[str, tuple[SimQuery, float]] = {}

    def at(when: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(events, (when, next(seq), fn))

    def run(q: SimQuery, plan: RagPlan, arrival: float, now: float, job_id: str | None,
            est_s: float | None = None) -> None:
        o = q.outcomes.get(plan) or q.outcomes[_nearest(plan, q.outcomes)]
        rounds = _rounds(plan, o, settings)

        def next_round(t: float, i: int = 0) -> None:
            if i == len(rounds):
                rows.append(SimRow(q.query_id, plan, o.quality, arrival, t - arrival, est_s, t - now))
                if job_id is not None:
                    scheduler.release(job_id)
                    admit(t)
                return
            left = [len(rounds[i])]

            def one_done(t_done: float) -> None:
                left[0] -= 1
                if left[0] == 0:
                    next_round(t_done, i + 1)
            engine.submit([_Call(p, out, res, one_done, tag) for p, out, res, tag in rounds[i]])
            kick(t)
        next_round(now)

    def effective(now: float) -> EngineStats:
        s = engine.stats(now)
        return replace(s, kv_used_tokens=max(0, s.kv_used_tokens - scheduler.held_tokens))

    def admit(now: float) -> None:
        for d in scheduler.schedule(effective(now), now_s=now):
            q, arrival = pending.pop(d.job.id)
            run(q, d.plan, arrival, now, d.job.id, d.backlog_s + d.cost.est_latency_s)

    running = [False]

    def kick(now: float) -> None:
        if not running[0] and not engine.idle:
            running[0] = True
            at(max(now, engine.busy_until), loop)

    def loop(now: float) -> None:
        end = engine.step(now)
        engine.busy_until = end
        running[0] = False
        if not engine.idle:
            running[0] = True
            at(end, loop)
        admit(end)

    def arrive(q: SimQuery, arrival: float) -> Callable[[float], None]:
        def fn(now: float) -> None:
            if system.plan is not None or system.replay:
                run(q, system.plan or next(iter(q.outcomes)), arrival, now, None)
                return
            t = now + settings.decision_overhead_s
            stats = engine.stats(now)
            scheduler.cost_model = cost.timed(stats.speeds, stats.num_running)
            plans = tuple(p for p in q.outcomes if p.num_chunks <= len(q.chunk_tokens))
            qualities = tuple(q.predicted.get(p, 0.0) for p in plans) if system.name == "tuned" else ()
            job_id = f"{q.query_id}@{arrival:.6f}"
            scheduler.add(Job(job_id, plans, Method.STUFF, q.chunk_tokens, q.question_tokens,
                              arrival_s=arrival, qualities=qualities))
            pending[job_id] = (q, arrival)
            admit(t)
        return fn

    for q, a in zip(queries, arrivals):
        at(a, arrive(q, a))
    while events:
        when, _, fn = heapq.heappop(events)
        fn(when)
    rows.sort(key=lambda r: r.arrival_s)
    return rows


def _nearest(plan: RagPlan, outcomes: dict[RagPlan, Outcome]) -> RagPlan:
    """METIS' fallback may pick a chunk count the sweep never ran: the closest swept plan of the
    same method (fewer chunks first), else the closest of any method."""
    same = [p for p in outcomes if p.method is plan.method]
    pool = same or list(outcomes)
    return min(pool, key=lambda p: (abs(p.num_chunks - plan.num_chunks), p.num_chunks > plan.num_chunks))


def summarize(rows: Sequence[SimRow], slo_s: float | None = None) -> dict[str, Any]:
    lat = sorted(r.latency_s for r in rows)
    n = len(rows)
    out: dict[str, Any] = {"n": n, "quality": sum(r.quality for r in rows) / n,
                           "mean_s": sum(lat) / n, "p95_s": percentile(lat, 95)}
    timed = [r for r in rows if r.est_service_s is not None and r.service_s]
    if timed:
        out["service_est_median_abs_err"] = statistics.median(abs(r.est_service_s - r.service_s) / r.service_s
                                                              for r in timed)
        # bias: the mean estimate over the mean actual (per-query ratios drown in output-length noise)
        out["service_est_bias"] = sum(r.est_service_s for r in timed) / sum(r.service_s for r in timed)
    if slo_s is not None:
        ok = [r for r in rows if r.latency_s <= slo_s]
        span = max(r.arrival_s + r.latency_s for r in rows) - min(r.arrival_s for r in rows)
        out["slo_attainment"] = len(ok) / n
        out["goodput_qps"] = len(ok) / span if span > 0 else 0.0
    return out


# ---------------------------------------------------------------------------- from sweeps

def fit_speeds(records: Sequence[Any]) -> EngineSpeeds:
    """Engine speeds that explain a sweep's idle latencies: least squares of each single-call
    record's latency on (prompt tokens, output tokens) -> 1/prefill rate, step seconds. The
    sweep ran one query at a time, so its calls decoded alone (batch 1); the batch slope is
    the embedded engine's typical CPU ratio (10% of a step per extra row)."""
    import numpy as np

    rows = [r for r in records if r.error is None and r.latency_s and r.num_calls == 1 and r.output_tokens]
    if len(rows) < 4:
        raise ValueError(f"need >= 4 single-call records to fit speeds, got {len(rows)}")
    a = np.asarray([[r.prompt_tokens, r.output_tokens] for r in rows], dtype=float)
    b = np.asarray([r.latency_s for r in rows])
    (per_token, step), *_ = np.linalg.lstsq(a, b, rcond=None)
    per_token, step = max(per_token, 1e-5), max(step, 1e-4)
    tags = {"stuff": [], "map_rerank": []}
    for r in records:
        if r.error is None and r.plan.method.value in tags and r.num_calls:
            tags[r.plan.method.value].append(r.output_tokens / r.num_calls)
    outputs = {k: float(sum(v) / len(v)) for k, v in tags.items() if v}
    return EngineSpeeds(float(1.0 / per_token), float(step), float(0.1 * step), len(rows), len(rows), outputs)


def fit_overhead_tokens(queries: Sequence[SimQuery], model: ModelSpec) -> int:
    """The per-call template tokens that make the cost model's stuff prompts equal the swept
    ones (median over every stuff record), as the live planner measures the template on its
    engine: a guessed overhead biases every predicted service time."""
    bare = CostModel(model, CostConfig(overhead_tokens_per_call=0))   # prices all but the template
    gaps = [o.prompt_tokens - bare.estimate(p, q.chunk_tokens, q.question_tokens).prompt_tokens
            for q in queries for p, o in q.outcomes.items()
            if p.method is Method.STUFF and p.num_chunks <= len(q.chunk_tokens)]
    if not gaps:
        raise ValueError("no stuff records to fit the template overhead from")
    return max(0, round(statistics.median(gaps)))


def sim_queries(records: Sequence[Any], retrieval: dict[str, dict[str, list]], predicted: dict[tuple[str, str], float],
                header_tokens: int = 8) -> list[SimQuery]:
    """One SimQuery per swept query that has a record for every plan of its grid."""
    by_query: dict[str, list[Any]] = {}
    for r in records:
        by_query.setdefault(r.query_id, []).append(r)
    grid = {r.plan for r in records}
    out = []
    for qid, recs in by_query.items():
        if {r.plan for r in recs} != grid or qid not in retrieval:
            continue
        ret = retrieval[qid]
        outcomes = {r.plan: Outcome(r.quality, r.prompt_tokens, r.output_tokens, max(1, r.num_calls)) for r in recs}
        qtokens = max(1, round(1.3 * len(recs[0].question.split())))
        out.append(SimQuery(qid, tuple(t + header_tokens for t in ret["tokens"]), qtokens, outcomes,
                            {r.plan: predicted.get((qid, str(r.plan)), 0.0) for r in recs}))
    return out
