"""Workload generation (pure): which questions arrive, and when.

A workload is a seeded sample of a dataset's questions with Poisson arrival times:
inter-arrival gaps are exponential with mean 1/rate, drawn from `random.Random(seed)`,
so the same (questions, num, rate, seed) gives the same trace on every machine. Every
system of one evaluation run replays the same trace (METIS: 200 queries per dataset,
Poisson arrivals at rate 2).

`rate = inf` releases every query at t = 0 (a burst); `rate = 0` is not a rate.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Collection, Sequence

from ragserve.errors import BadInput


def poisson_arrivals(num: int, rate_qps: float, seed: int | str = 0) -> list[float]:
    """`num` arrival times in seconds, non-decreasing, the first one gap after t = 0."""
    if num < 0:
        raise BadInput(f"num={num} must be >= 0")
    if not rate_qps > 0:
        raise BadInput(f"rate={rate_qps} queries/s must be > 0 (use inf for a burst)")
    if math.isinf(rate_qps):
        return [0.0] * num
    rng = random.Random(f"arrivals:{seed}")
    t, out = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate_qps)
        out.append(t)
    return out


def sample_questions(rows: Sequence[dict[str, Any]], num: int, seed: int | str = 0,
                     exclude_ids: Collection[str] = frozenset()) -> list[dict[str, Any]]:
    """A seeded sample of `num` rows (all of them, shuffled, when num >= len(rows)).

    `exclude_ids` (a learned profiler's training queries) are drawn and then replaced by
    further seeded draws from the rest, so an exclusion that misses the sample leaves it
    exactly as it was: a run that only adds a profiler trained elsewhere replays the same
    trace, and its fixed-plan systems stay comparable (and resumable)."""
    if num < 1:
        raise BadInput(f"num={num} must be >= 1")
    rows = list(rows)
    drawn = random.Random(f"sample:{seed}").sample(rows, min(num, len(rows)))
    kept = [r for r in drawn if r["id"] not in exclude_ids]
    missing = len(drawn) - len(kept)
    if missing:
        taken = {r["id"] for r in drawn}
        rest = [r for r in rows if r["id"] not in taken and r["id"] not in exclude_ids]
        kept += random.Random(f"refill:{seed}").sample(rest, min(missing, len(rest)))
    return kept


@dataclass(frozen=True)
class WorkItem:
    question: dict[str, Any]    # a questions.jsonl row (id, question, answers, ...)
    arrival_s: float            # seconds after the run starts


@dataclass(frozen=True)
class Workload:
    dataset: str
    items: tuple[WorkItem, ...]
    rate_qps: float
    seed: int | str

    @property
    def duration_s(self) -> float:
        """Time of the last arrival."""
        return self.items[-1].arrival_s if self.items else 0.0

    def with_rate(self, rate_qps: float) -> "Workload":
        """The same questions, in the same order, re-timed at another rate."""
        arrivals = poisson_arrivals(len(self.items), rate_qps, self.seed)
        items = tuple(WorkItem(i.question, t) for i, t in zip(self.items, arrivals))
        return Workload(self.dataset, items, rate_qps, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "num": len(self.items), "rate_qps": self.rate_qps,
                "seed": self.seed, "duration_s": round(self.duration_s, 3),
                "question_ids": [i.question["id"] for i in self.items]}


def make_workload(dataset: str, rows: Sequence[dict[str, Any]], num: int, rate_qps: float,
                  seed: int | str = 0, exclude_ids: Collection[str] = frozenset()) -> Workload:
    questions = sample_questions(rows, num, seed, exclude_ids)
    arrivals = poisson_arrivals(len(questions), rate_qps, seed)
    return Workload(dataset, tuple(WorkItem(q, t) for q, t in zip(questions, arrivals)), rate_qps, seed)
