"""Scheduler tests drive the public loop: add(job) -> schedule(stats) -> decisions."""
import logging
from dataclasses import replace

import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import AdmissionRejected, BadInput, NoFeasiblePlan
from ragserve.metis.rules import PlanPruner
from ragserve.metis.scheduler import Job, Reason
from tests.metis.factories import (
    budget, make_cost_model, make_job, make_model_spec, make_profile, make_scheduler,
    make_stats, stuff_plans,
)

STUFF = Method.STUFF


def plan(n, method=STUFF, inter=0):
    return RagPlan(method, n, inter)


# ------------------------------------------------------------------ best fit

def test_best_fit_picks_6_of_5_to_10_when_5_and_6_fit():
    free = budget(plan(6))
    assert budget(plan(5)) <= free < budget(plan(7))
    sched = make_scheduler()
    sched.add(make_job(plans=stuff_plans(5, 10)))
    [d] = sched.schedule(make_stats(free), now_s=0.0)
    assert d.plan == plan(6)
    assert d.reason is Reason.FIT
    assert d.kv_free_tokens == free
    assert d.cost.kv_budget_tokens == budget(plan(6))
    assert sched.num_waiting == 0


def test_best_fit_takes_the_largest_when_all_fit():
    sched = make_scheduler()
    sched.add(make_job(plans=stuff_plans(5, 10)))
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(10) and d.reason is Reason.FIT


def test_best_fit_compares_methods_by_memory():
    plans = stuff_plans(3, 4) + stuff_plans(3, 4, Method.MAP_REDUCE, 50)
    job = make_job(plans=plans)
    costs = sorted((budget(p, job), p) for p in plans)
    free = costs[-2][0]                       # everything but the largest fits
    sched = make_scheduler()
    sched.add(job)
    [d] = sched.schedule(make_stats(free), now_s=0.0)
    assert d.plan == costs[-2][1]


# ------------------------------------------------------------------ fallback and waiting

def test_fallback_with_as_many_chunks_as_fit_when_nothing_fits():
    plans = stuff_plans(5, 10, Method.MAP_REDUCE, 100)
    job = make_job(plans=plans, fallback=STUFF)
    free = budget(plan(4), job)
    assert free < min(budget(p, job) for p in plans)
    assert budget(plan(5), job) > free
    sched = make_scheduler()
    sched.add(job)
    [d] = sched.schedule(make_stats(free), now_s=0.0)
    assert d.plan == plan(4) and d.reason is Reason.FALLBACK


def test_fallback_without_joint_reasoning_is_map_rerank():
    job = make_job(plans=stuff_plans(5, 10, Method.MAP_RERANK), fallback=Method.MAP_RERANK)
    free = budget(plan(3, Method.MAP_RERANK), job)
    sched = make_scheduler()
    sched.add(job)
    [d] = sched.schedule(make_stats(free), now_s=0.0)
    assert d.plan == plan(3, Method.MAP_RERANK) and d.reason is Reason.FALLBACK


def test_fallback_never_exceeds_the_candidates_chunk_counts():
    # map_reduce over 2 chunks does not fit, but stuff could take 20: stay within 2
    job = make_job(plans=(plan(2, Method.MAP_REDUCE, 2000),), fallback=STUFF)
    sched = make_scheduler()
    sched.add(job)
    [d] = sched.schedule(make_stats(budget(plan(20), job)), now_s=0.0)
    assert d.plan == plan(2) and d.reason is Reason.FALLBACK


def test_waits_when_even_the_fallback_does_not_fit_then_runs():
    sched = make_scheduler()
    job = make_job()
    sched.add(job)
    assert sched.schedule(make_stats(budget(plan(1)) - 1), now_s=0.0) == []
    assert sched.num_waiting == 1
    # calls finished: free KV is back
    [d] = sched.schedule(make_stats(budget(plan(6))), now_s=2.5)
    assert d.job is job and d.plan == plan(6)
    assert d.wait_s == pytest.approx(2.5)
    assert sched.num_waiting == 0


# ------------------------------------------------------------------ one step, several jobs

def test_two_jobs_in_one_step_share_free_kv():
    free = budget(plan(10)) + budget(plan(5))
    sched = make_scheduler()
    sched.add(make_job("a"))
    sched.add(make_job("b"))
    first, second = sched.schedule(make_stats(free), now_s=0.0)
    assert (first.job.id, first.plan, first.kv_free_tokens) == ("a", plan(10), free)
    assert (second.job.id, second.plan) == ("b", plan(5))
    assert second.kv_free_tokens == free - first.cost.kv_budget_tokens
    assert first.cost.kv_budget_tokens + second.cost.kv_budget_tokens <= free


def test_second_job_waits_when_the_first_took_the_memory():
    sched = make_scheduler()
    sched.add(make_job("a"))
    sched.add(make_job("b"))
    [d] = sched.schedule(make_stats(budget(plan(10)) + budget(plan(1)) - 1), now_s=0.0)
    assert d.job.id == "a" and sched.num_waiting == 1


def _big_and_small():
    big = make_job("big", chunk_tokens=1000, arrival_s=0.0)      # min: stuff:1 over 1000 tokens
    small = make_job("small", chunk_tokens=10, arrival_s=1.0)
    return big, small


def test_fcfs_blocked_head_blocks_the_queue():
    big, small = _big_and_small()
    sched = make_scheduler("fcfs")
    sched.add(big)
    sched.add(small)
    free = budget(plan(1), big) - 1
    assert budget(plan(10), small) <= free
    assert sched.schedule(make_stats(free), now_s=2.0) == []
    assert sched.num_waiting == 2


def test_sjf_runs_the_small_job_past_a_blocked_big_one():
    big, small = _big_and_small()
    sched = make_scheduler("sjf")
    sched.add(big)
    sched.add(small)
    [d] = sched.schedule(make_stats(budget(plan(1), big) - 1), now_s=2.0)
    assert d.job.id == "small" and sched.num_waiting == 1


def test_fcfs_and_sjf_order():
    big, small = _big_and_small()
    for policy, expected in (("fcfs", ["big", "small"]), ("sjf", ["small", "big"])):
        sched = make_scheduler(policy)
        sched.add(big)
        sched.add(small)
        decisions = sched.schedule(make_stats(90_000), now_s=2.0)
        assert [d.job.id for d in decisions] == expected


# ------------------------------------------------------------------ SLO

def _latency(p, job=None):
    job = job or make_job()
    return make_cost_model().estimate(p, job.chunk_token_counts, job.question_tokens).est_latency_s


def test_slo_picks_the_largest_plan_meeting_it():
    slo = (_latency(plan(7)) + _latency(plan(8))) / 2
    sched = make_scheduler()
    sched.add(make_job(slo_s=slo, arrival_s=0.0))
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(7) and d.reason is Reason.SLO
    assert d.cost.est_latency_s <= slo


def test_slo_counts_time_already_waited():
    slo = (_latency(plan(7)) + _latency(plan(8))) / 2
    waited = slo - (_latency(plan(5)) + _latency(plan(6))) / 2   # time left: between 5 and 6
    sched = make_scheduler()
    sched.add(make_job(slo_s=slo, arrival_s=0.0))
    [d] = sched.schedule(make_stats(50_000), now_s=waited)
    assert d.plan == plan(5) and d.reason is Reason.SLO


def test_a_job_carries_its_collections_blend_fraction():
    """Blending makes every stuff plan meet the SLO; a collection whose blend the gate refused
    is priced at full prefill and gets what a plain engine would."""
    slo = (_latency(plan(7)) + _latency(plan(8))) / 2
    blending = make_cost_model(blend_prefill_fraction=0.15)
    picks = {}
    for frac in (None, 1.0):
        sched = make_scheduler(cost_model=blending)
        sched.add(replace(make_job(slo_s=slo, arrival_s=0.0), blend_fraction=frac))
        [d] = sched.schedule(make_stats(50_000), now_s=0.0)
        picks[frac] = d.plan
    assert picks == {None: plan(10), 1.0: plan(7)}


def test_loose_slo_is_plain_best_fit():
    sched = make_scheduler()
    sched.add(make_job(slo_s=1000.0))
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(10) and d.reason is Reason.FIT


def test_slo_below_every_candidate_falls_back_to_fewer_chunks():
    slo = (_latency(plan(3)) + _latency(plan(4))) / 2
    sched = make_scheduler()
    sched.add(make_job(slo_s=slo))
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(3) and d.reason is Reason.FALLBACK


def test_impossible_slo_still_runs_the_cheapest_plan():
    sched = make_scheduler()
    sched.add(make_job(slo_s=0.01))
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(1) and d.reason is Reason.FALLBACK


# ------------------------------------------------------------------ infeasible, queue

def test_no_feasible_plan_when_fallback_exceeds_total_capacity():
    sched = make_scheduler(kv_capacity_tokens=budget(plan(1)) - 1)
    with pytest.raises(NoFeasiblePlan, match="total capacity"):
        sched.add(make_job())
    assert sched.num_waiting == 0


def test_no_feasible_plan_when_one_chunk_exceeds_the_context():
    model = make_cost_model(make_model_spec("smollm2", max_context=100))
    sched = make_scheduler(cost_model=model)
    with pytest.raises(NoFeasiblePlan, match="context"):
        sched.add(make_job())


def test_candidates_over_the_context_are_never_chosen():
    job = make_job()
    call_7 = make_cost_model().estimate(plan(7), job.chunk_token_counts, 10).max_call_tokens
    model = make_cost_model(make_model_spec("smollm2", max_context=call_7 - 1))
    sched = make_scheduler(cost_model=model)
    sched.add(make_job())
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    assert d.plan == plan(6)


def test_capacity_learned_from_stats_drops_jobs_that_can_never_run():
    sched = make_scheduler()
    sched.add(make_job("a"))
    cap = budget(plan(1)) - 1
    assert sched.schedule(make_stats(cap, capacity=cap), now_s=0.0) == []
    [(job, error)] = sched.take_infeasible()
    assert job.id == "a" and isinstance(error, NoFeasiblePlan)
    assert sched.num_waiting == 0
    with pytest.raises(NoFeasiblePlan):
        sched.add(make_job("b"))


def test_cancel():
    sched = make_scheduler()
    sched.add(make_job("a"))
    assert sched.cancel("a") and not sched.cancel("a")
    assert sched.schedule(make_stats(50_000)) == []


def test_queue_limit_rejects_with_retry_after():
    sched = make_scheduler(max_waiting=1, retry_after_s=3.0)
    sched.add(make_job("a"))
    with pytest.raises(AdmissionRejected) as exc:
        sched.add(make_job("b"))
    assert exc.value.retry_after_s == 3.0


def test_duplicate_job_id_is_rejected():
    sched = make_scheduler()
    sched.add(make_job("a"))
    with pytest.raises(BadInput, match="'a'"):
        sched.add(make_job("a"))


def test_hold_until_release_keeps_reservations_across_steps():
    sched = make_scheduler(hold_until_release=True)
    sched.add(make_job("a"))
    [a] = sched.schedule(make_stats(budget(plan(10))), now_s=0.0)
    sched.add(make_job("b"))
    # a stale snapshot that does not count a's calls yet: b must not take a's memory
    assert sched.schedule(make_stats(budget(plan(10))), now_s=0.1) == []
    sched.release("a")
    [b] = sched.schedule(make_stats(budget(plan(10))), now_s=0.2)
    assert b.plan == plan(10)


# ------------------------------------------------------------------ observability

def test_counters_and_one_info_line_per_decision(caplog):
    sched = make_scheduler()
    sched.add(make_job("a"))
    sched.add(make_job("b", plans=stuff_plans(5, 10, Method.MAP_RERANK), fallback=Method.MAP_RERANK))
    with caplog.at_level(logging.INFO, logger="ragserve.metis.scheduler"):
        decisions = sched.schedule(make_stats(budget(plan(10)) + budget(plan(2, Method.MAP_RERANK))),
                                   now_s=0.0)
    assert [d.reason for d in decisions] == [Reason.FIT, Reason.FALLBACK]
    assert sched.counters() == {"plans": {"stuff": 1, "map_rerank": 1},
                                "reasons": {"fit": 1, "fallback": 1}}
    records = [r for r in caplog.records if r.name == "ragserve.metis.scheduler"]
    assert len(records) == 2
    assert records[0].args                     # lazy %-formatting, not an f-string
    assert "plan=stuff:10" in records[0].getMessage() and "reason=fit" in records[0].getMessage()
    assert "kv_free=" in records[1].getMessage()


def test_decision_to_dict_for_the_cli():
    sched = make_scheduler()
    sched.add(make_job())
    [d] = sched.schedule(make_stats(50_000), now_s=0.0)
    out = d.to_dict()
    assert out["plan"] == {"method": "stuff", "num_chunks": 10, "intermediate_tokens": 0}
    assert out["reason"] == "fit" and out["kv_free_tokens"] == 50_000
    assert out["cost"]["kv_budget_tokens"] == budget(plan(10))


# ------------------------------------------------------------------ planner -> scheduler

def test_profile_to_decision_end_to_end():
    planner = PlanPruner()
    profile = make_profile("high", joint=True, pieces=2, summary=(30, 60))
    space = planner.plan(profile, max_chunks=30)
    job = Job.from_space("q1", space, [120] * 30, question_tokens=12, arrival_s=0.0)
    assert job.profile is profile and job.fallback is STUFF
    sched = make_scheduler()
    sched.add(job)
    [d] = sched.schedule(make_stats(2_000), now_s=0.0)
    assert d.plan in space.plans and d.cost.kv_budget_tokens <= 2_000
    larger = [p for p in space.plans if budget(p, job) > d.cost.kv_budget_tokens]
    assert all(budget(p, job) > 2_000 for p in larger)
