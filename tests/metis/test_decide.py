"""The tuned decision rule, measured speeds and timed cost: pure, with factories (no model)."""
from __future__ import annotations

import pytest

from ragserve.config import TunedConfig
from ragserve.metis.decide import Candidate, choose
from ragserve.domain import EngineSpeeds, Method, RagPlan
from ragserve.engines.speeds import SpeedTracker
from ragserve.errors import ConfigError
from ragserve.metis.scheduler import Job, Reason, engine_backlog_s
from tests.metis.factories import make_cost_model, make_scheduler, make_stats

SPEEDS = EngineSpeeds(prefill_tok_s=200.0, step_base_s=0.1, step_per_row_s=0.01,
                      output_tokens={"stuff": 8.0, "map_rerank": 10.0})


def stuff(n: int) -> RagPlan:
    return RagPlan(Method.STUFF, n)


def cands(qualities: dict[int, float], speeds: EngineSpeeds = SPEEDS) -> list[Candidate]:
    cm = make_cost_model().timed(speeds)
    counts = [200] * 10
    return [Candidate(stuff(n), cm.estimate(stuff(n), counts, 10), q) for n, q in qualities.items()]


# -- measured speed ------------------------------------------------------------------------
def test_tracker_answers_with_its_prior_until_it_has_measured():
    prior = EngineSpeeds(100.0, 0.2, 0.02)
    t = SpeedTracker(prior)
    assert t.speeds() == prior
    for _ in range(8):
        t.record_prefill(400, 1.0)
    assert t.speeds().prefill_tok_s == pytest.approx(400.0)
    assert t.speeds().step_base_s == prior.step_base_s    # no decode measured yet


def test_tracker_fits_step_time_against_batch_size():
    t = SpeedTracker(EngineSpeeds(100.0, 0.2, 0.02))
    for batch in (1, 2, 4, 8) * 3:
        t.record_step(batch, 0.09 + 0.01 * batch)   # base 0.1 at batch 1, +0.01 per row
    s = t.speeds()
    assert s.step_base_s == pytest.approx(0.1)
    assert s.step_per_row_s == pytest.approx(0.01)
    assert s.decode_step_s(8) == pytest.approx(0.17)


def test_tracker_with_one_batch_size_keeps_the_prior_slope_ratio():
    t = SpeedTracker(EngineSpeeds(100.0, 0.2, 0.02))   # slope = 10% of base
    for _ in range(5):
        t.record_step(1, 0.05)
    s = t.speeds()
    assert s.step_base_s == pytest.approx(0.05)
    assert s.step_per_row_s == pytest.approx(0.005)


def test_expected_output_is_the_measured_mean_capped_by_max_tokens():
    t = SpeedTracker(EngineSpeeds(100.0, 0.2, 0.0))
    for n in (6, 8, 10):
        t.record_output("stuff", n)
    s = t.speeds()
    assert s.expected_output("stuff", 64) == pytest.approx(8.0)
    assert s.expected_output("stuff", 5) == 5.0
    assert s.expected_output("map", 32) == 32.0      # never measured: the cap


def test_the_window_forgets_old_measurements():
    t = SpeedTracker(EngineSpeeds(100.0, 0.2, 0.0), window=4)
    for _ in range(4):
        t.record_prefill(100, 1.0)
    for _ in range(4):
        t.record_prefill(300, 1.0)
    assert t.speeds().prefill_tok_s == pytest.approx(300.0)


def test_tracker_measures_the_prefill_pause_per_decode_step():
    t = SpeedTracker(EngineSpeeds(100.0, 0.2, 0.0))
    t.record_decode(2.0, 1.0, 10)          # 10 steps of 0.1 s; waited 1 s for others' prefills
    assert t.speeds().prefill_pause_s == 0.0   # fewer samples than the minimum: the prior
    for _ in range(3):
        t.record_decode(1.0, 1.0, 10)      # decoded alone
    assert t.speeds().prefill_pause_s == pytest.approx(1.0 / 40)


def test_speeds_round_trip_and_reject_a_negative_pause():
    s = EngineSpeeds(100.0, 0.2, 0.02, 4, 4, {"stuff": 6.0}, prefill_pause_s=0.05)
    assert EngineSpeeds.from_dict(s.to_dict()) == s
    assert s.decode_s(10, 1) == pytest.approx(10 * (0.2 + 0.05))
    with pytest.raises(ValueError, match="prefill_pause_s"):
        EngineSpeeds(100.0, 0.2, 0.02, prefill_pause_s=-0.1)


# -- timed cost ----------------------------------------------------------------------------
def test_timed_cost_prices_measured_prefill_and_expected_output():
    cm = make_cost_model().timed(SPEEDS)
    c = cm.estimate(stuff(2), [200, 200], 10)
    # prompt 10 + 20 overhead + 400 = 430 tokens at 200 tok/s, 8 expected tokens at 0.1 s/step
    assert c.est_latency_s == pytest.approx(430 / 200 + 8 * 0.1)
    busy = make_cost_model().timed(SPEEDS, running_rows=5).estimate(stuff(2), [200, 200], 10)
    assert busy.est_latency_s == pytest.approx(430 / 200 + 8 * (0.1 + 5 * 0.01))


def test_timed_cost_adds_the_measured_prefill_pause_to_every_decode_step():
    from dataclasses import replace

    loaded = replace(SPEEDS, prefill_pause_s=0.3)
    c = make_cost_model().timed(loaded).estimate(stuff(2), [200, 200], 10)
    assert c.est_latency_s == pytest.approx(430 / 200 + 8 * (0.1 + 0.3))


def test_map_rerank_decodes_its_fan_out_as_one_larger_batch():
    cm = make_cost_model().timed(SPEEDS)
    c = cm.estimate(RagPlan(Method.MAP_RERANK, 4), [200] * 4, 10)
    assert c.est_latency_s == pytest.approx((4 * 30 + 800) / 200 + 10 * (0.1 + 3 * 0.01))


def test_untimed_cost_uses_the_config_priors_and_output_caps():
    c = make_cost_model().estimate(stuff(2), [200, 200], 10)
    assert c.est_latency_s == pytest.approx(430 / 2000 + 30 / 20)


# -- the rule ------------------------------------------------------------------------------
def test_idle_engine_buys_quality_when_it_is_worth_its_seconds():
    rule = TunedConfig(time_value=0.01, slack=3.0)
    # stuff:3 is +0.05 for 2 s more (worth 0.02 idle): it wins
    choice = choose(cands({1: 0.40, 3: 0.45}), free_kv_tokens=10**6, max_context=8192, backlog_s=0.0,
                    slo_left_s=None, rule=rule)
    assert choice.candidate.plan == stuff(3) and choice.reason == "quality"


def test_under_load_time_is_dearer_and_the_rule_degrades_to_cheaper_plans():
    rule = TunedConfig(time_value=0.01, slack=3.0)
    choice = choose(cands({1: 0.40, 3: 0.45}), free_kv_tokens=10**6, max_context=8192, backlog_s=6.0,
                    slo_left_s=None, rule=rule)
    assert choice.candidate.plan == stuff(1) and choice.reason == "load"
    assert choice.completion_s == pytest.approx(6.0 + choice.candidate.cost.est_latency_s)


def test_a_predicted_loss_is_never_bought_and_ties_go_to_the_faster_plan():
    rule = TunedConfig(time_value=0.0, tie=0.01)
    choice = choose(cands({1: 0.40, 3: 0.405, 6: 0.30}), free_kv_tokens=10**6, max_context=8192,
                    backlog_s=0.0, slo_left_s=None, rule=rule)
    assert choice.candidate.plan == stuff(1)


def test_the_budget_drops_slow_plans_and_an_slo_binds():
    rule = TunedConfig(time_value=0.0, slack=1.5)
    c = cands({1: 0.3, 3: 0.5, 6: 0.6})
    # cheapest completes in ~1.95 s -> budget ~2.9 s: stuff:3 (3.95 s) and stuff:6 are out
    assert choose(c, free_kv_tokens=10**6, max_context=8192, backlog_s=0.0, slo_left_s=None,
                  rule=rule).candidate.plan == stuff(1)
    loose = TunedConfig(time_value=0.0, slack=10.0)
    assert choose(c, free_kv_tokens=10**6, max_context=8192, backlog_s=0.0, slo_left_s=None,
                  rule=loose).candidate.plan == stuff(6)
    slo = choose(c, free_kv_tokens=10**6, max_context=8192, backlog_s=0.0, slo_left_s=4.5, rule=loose)
    assert slo.candidate.plan == stuff(3) and slo.reason == "slo"


def test_kv_is_a_hard_constraint_and_nothing_fitting_means_wait():
    c = cands({1: 0.3, 6: 0.6})
    small = c[0].cost.kv_budget_tokens
    pick = choose(c, free_kv_tokens=small, max_context=8192, backlog_s=0.0, slo_left_s=None,
                  rule=TunedConfig(time_value=0.0, slack=100.0))
    assert pick.candidate.plan == stuff(1)
    assert choose(c, free_kv_tokens=small - 1, max_context=8192, backlog_s=0.0, slo_left_s=None,
                  rule=TunedConfig()) is None


def test_tuned_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="tuned.slack"):
        TunedConfig(slack=0.5)
    with pytest.raises(ConfigError, match="tuned.planner='bogus'"):
        TunedConfig(planner="bogus")


# -- in the scheduler ----------------------------------------------------------------------
def test_scheduler_applies_the_rule_to_jobs_with_predicted_qualities_and_counts_backlog():
    sched = make_scheduler()
    sched.cost_model = make_cost_model().timed(SPEEDS)
    sched.rule = TunedConfig(time_value=0.01, slack=3.0)
    plans = (stuff(1), stuff(3))
    counts = (200,) * 10
    sched.add(Job("a", plans, Method.STUFF, counts, 10, arrival_s=0.0, qualities=(0.40, 0.45)))
    sched.add(Job("b", plans, Method.STUFF, counts, 10, arrival_s=0.0, qualities=(0.40, 0.45)))
    stats = make_stats(free=90_000)
    from dataclasses import replace
    stats = replace(stats, speeds=SPEEDS, queued_prefill_tokens=1200)   # 6 s of prefill queued
    assert engine_backlog_s(stats) == pytest.approx(6.0)
    (a, b) = sched.schedule(stats, now_s=0.0)
    assert a.plan == stuff(1) and a.reason is Reason.LOAD and a.backlog_s == pytest.approx(6.0)
    # b sees a's prefill ahead of it too
    assert b.backlog_s == pytest.approx(6.0 + a.cost.prefill_tokens / 200)
    assert a.to_dict()["predicted_quality"] == 0.4
    idle = make_scheduler()
    idle.cost_model = make_cost_model().timed(SPEEDS)
    idle.rule = TunedConfig(time_value=0.01, slack=3.0)
    idle.add(Job("c", plans, Method.STUFF, counts, 10, arrival_s=0.0, qualities=(0.40, 0.45)))
    (c,) = idle.schedule(replace(make_stats(free=90_000), speeds=SPEEDS), now_s=0.0)
    assert c.plan == stuff(3) and c.reason is Reason.QUALITY
