"""Workload generator: seeded Poisson arrivals and question samples."""
from __future__ import annotations

import math
import statistics

import pytest

from ragserve.errors import BadInput
from ragserve.eval.workload import make_workload, poisson_arrivals, sample_questions

ROWS = [{"id": f"q{i}", "question": f"question {i}?", "answers": ["a"]} for i in range(50)]


def test_arrivals_are_deterministic_per_seed_and_sorted():
    a = poisson_arrivals(200, 2.0, seed=7)
    assert a == poisson_arrivals(200, 2.0, seed=7)
    assert a != poisson_arrivals(200, 2.0, seed=8)
    assert a == sorted(a) and a[0] > 0 and len(a) == 200


def test_mean_rate_within_tolerance():
    # 20,000 exponential gaps: the mean gap's standard error is 1/(rate*sqrt(n)) ~ 0.7%
    arrivals = poisson_arrivals(20_000, 4.0, seed=1)
    gaps = [b - a for a, b in zip([0.0] + arrivals, arrivals)]
    assert len(arrivals) / arrivals[-1] == pytest.approx(4.0, rel=0.03)
    # exponential gaps: standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(statistics.fmean(gaps), rel=0.05)


def test_rate_over_many_seeds():
    rates = [50 / poisson_arrivals(50, 0.5, seed=s)[-1] for s in range(400)]
    assert statistics.fmean(rates) == pytest.approx(0.5, rel=0.05)


def test_burst_and_bad_rates():
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(BadInput):
            poisson_arrivals(3, bad)


def test_sample_is_seeded_and_capped():
    a = sample_questions(ROWS, 10, seed=3)
    assert [r["id"] for r in a] == [r["id"] for r in sample_questions(ROWS, 10, seed=3)]
    assert len({r["id"] for r in a}) == 10
    assert len(sample_questions(ROWS, 500, seed=3)) == len(ROWS)
    with pytest.raises(BadInput):
        sample_questions(ROWS, 0)


def test_exclusions_replace_only_the_drawn_questions_they_hit():
    drawn = [r["id"] for r in sample_questions(ROWS, 10, seed=3)]
    others = [r["id"] for r in ROWS if r["id"] not in drawn]
    # training queries outside the sample: the sample (and its order) is unchanged
    assert [r["id"] for r in sample_questions(ROWS, 10, seed=3, exclude_ids=set(others[:5]))] == drawn
    # two of them inside it: those two are replaced, the other eight stay in place, seeded
    hit = {drawn[1], drawn[4]}
    again = [r["id"] for r in sample_questions(ROWS, 10, seed=3, exclude_ids=hit)]
    assert again[:8] == [i for i in drawn if i not in hit] and not hit & set(again) and len(set(again)) == 10
    assert again == [r["id"] for r in sample_questions(ROWS, 10, seed=3, exclude_ids=hit)]
    everything_else = {r["id"] for r in ROWS} - set(drawn[:3])
    assert [r["id"] for r in sample_questions(ROWS, 10, seed=3, exclude_ids=everything_else)] == drawn[:3]


def test_workload_and_retiming_keep_the_questions():
    w = make_workload("squad", ROWS, 8, 1.0, seed=5)
    assert len(w.items) == 8 and w.duration_s == w.items[-1].arrival_s
    faster = w.with_rate(10.0)
    assert [i.question["id"] for i in faster.items] == [i.question["id"] for i in w.items]
    assert faster.duration_s < w.duration_s and faster.rate_qps == 10.0
    assert w.to_dict()["question_ids"] == [i.question["id"] for i in w.items]


def test_tune_holdout_keeps_the_eval_sample_and_its_trace():
    from ragserve.eval.tuning import tune_questions

    tuned = {r["id"] for r in tune_questions(ROWS, 15, seed=0, holdout=20)}
    evaluated = make_workload("squad", ROWS, 20, 0.5, seed=0)
    assert len(tuned) == 15 and not tuned & {i.question["id"] for i in evaluated.items}
    # evaluating a profiler trained on `tuned` replays exactly the same trace
    assert make_workload("squad", ROWS, 20, 0.5, seed=0, exclude_ids=tuned) == evaluated
