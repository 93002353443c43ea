"""The load simulator on factories: engine model, queueing, and the tuned rule under load."""
from __future__ import annotations

import pytest

from ragserve.config import TunedConfig
from ragserve.domain import EngineSpeeds, Method, RagPlan
from ragserve.eval.simulator import Outcome, SimEngine, SimQuery, SimSettings, SimSystem, simulate, summarize
from tests.metis.factories import QWEN

SPEEDS = EngineSpeeds(prefill_tok_s=200.0, step_base_s=0.1, step_per_row_s=0.01,
                      output_tokens={"stuff": 8.0})
S1, S4 = RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 4)


def queries(n: int = 40) -> list[SimQuery]:
    out = []
    for i in range(n):
        # stuff:4 is better on every other query, by 0.2; stuff:1 costs a quarter of the prompt
        good4 = i % 2 == 0
        outcomes = {S1: Outcome(0.4, 250, 8, 1), S4: Outcome(0.6 if good4 else 0.4, 850, 8, 1)}
        predicted = {S1: 0.4, S4: 0.6 if good4 else 0.38}
        out.append(SimQuery(f"q{i}", (200,) * 10, 10, outcomes, predicted))
    return out


def settings(**kw) -> SimSettings:
    return SimSettings(speeds=SPEEDS, kv_capacity_tokens=kw.pop("kv", 100_000), model=QWEN,
                       overhead_tokens_per_call=40, **kw)


def test_one_query_alone_takes_its_prefill_plus_its_decode_steps():
    rows = simulate(queries(1), SimSystem("fixed:stuff:1", S1), rate_qps=0.01, settings=settings())
    # 250 prompt tokens at 200 tok/s; then 8 steps at batch 1 (7 tokens and the end token)
    assert rows[0].latency_s == pytest.approx(250 / 200 + 8 * 0.1)


def test_engine_model_admits_under_kv_and_batches_decode():
    done = []
    engine = SimEngine(SPEEDS, kv_capacity_tokens=600)
    from ragserve.eval.simulator import _Call
    engine.submit([_Call(200, 3, 300, done.append), _Call(200, 3, 300, done.append), _Call(200, 3, 300, done.append)])
    t = engine.step(0.0)   # two fit, prefilled together, one decode step at batch 2
    assert t == pytest.approx(400 / 200 + 0.11)
    assert [c.produced for c in engine.running] == [1, 1]
    assert len(engine.running) == 2 and len(engine.waiting) == 1
    while not engine.idle:
        t = engine.step(t)
    assert len(done) == 3


def test_engine_model_measures_prefill_pauses_and_outputs_per_tag_as_the_engines_do():
    from ragserve.eval.simulator import _Call
    engine = SimEngine(SPEEDS, kv_capacity_tokens=100_000)
    done, t = [], 0.0
    for _ in range(4):   # each call decodes 2 steps; the next one's 1 s prefill lands between them
        engine.submit([_Call(200, 2, 300, done.append, "map_rerank")])
        t = engine.step(t)
    while not engine.idle:
        t = engine.step(t)
    s = engine.stats(t).speeds
    assert s.output_tokens["map_rerank"] == 2.0 and s.output_tokens["stuff"] == 8.0
    # calls 1-3 waited out one 1 s prefill each over their 2 steps; call 4 decoded alone
    assert s.prefill_pause_s == pytest.approx(3 * 1.0 / 8)


def test_latency_grows_with_load_and_the_tuned_rule_sheds_it():
    qs = queries(60)
    fixed4 = [summarize(simulate(qs, SimSystem("fixed:stuff:4", S4), r, settings())) for r in (0.1, 0.5)]
    assert fixed4[1]["mean_s"] > 2 * fixed4[0]["mean_s"]          # queueing at 0.5 q/s
    rule = TunedConfig(time_value=0.01, slack=3.0)
    idle = summarize(simulate(qs, SimSystem("tuned"), 0.05, settings(rule=rule)))
    busy = summarize(simulate(qs, SimSystem("tuned"), 0.5, settings(rule=rule)))
    assert idle["quality"] == pytest.approx(0.5, abs=0.01)          # idle: stuff:4 where it pays
    assert busy["mean_s"] < fixed4[1]["mean_s"]                     # loaded: cheaper plans, no queue
    assert busy["quality"] >= 0.4


def test_summary_counts_slo_attainment_and_goodput():
    rows = simulate(queries(20), SimSystem("fixed:stuff:1", S1), 0.2, settings())
    out = summarize(rows, slo_s=10.0)
    assert out["n"] == 20 and out["slo_attainment"] == 1.0 and out["goodput_qps"] > 0


def test_planned_rows_carry_the_predicted_and_the_simulated_service_time():
    # priced with the sim's own prompt (200 + 10 + 40 = 250 tokens) and output (8 steps),
    # a query alone is predicted exactly; fixed plans are not planned, so carry no estimate
    rows = simulate(queries(1), SimSystem("tuned"), 0.01, settings(rule=TunedConfig(time_value=1.0)))
    assert rows[0].plan == S1
    assert rows[0].est_service_s == pytest.approx(rows[0].service_s, rel=0.02)
    assert summarize(rows)["service_est_median_abs_err"] < 0.02
    fixed = simulate(queries(1), SimSystem("fixed:stuff:1", S1), 0.01, settings())
    assert fixed[0].est_service_s is None and "service_est_median_abs_err" not in summarize(fixed)


def test_template_overhead_is_fitted_to_the_swept_prompts():
    from ragserve.eval.simulator import fit_overhead_tokens
    # question 10 + chunks of 100 (+ the cost model's 8-token header each) + a 40-token template
    s2 = RagPlan(Method.STUFF, 2)
    q = SimQuery("q", (100, 100), 10, {S1: Outcome(0.5, 158, 4, 1), s2: Outcome(0.5, 266, 4, 1)})
    assert fit_overhead_tokens([q], QWEN) == 40
    with pytest.raises(ValueError, match="no stuff records"):
        fit_overhead_tokens([SimQuery("q", (100,), 10, {RagPlan(Method.MAP_RERANK, 1): Outcome(0.5, 158, 4, 1)})], QWEN)


def test_given_arrivals_replace_the_poisson_trace_and_must_match_the_queries():
    qs = queries(2)
    rows = simulate(qs, SimSystem("fixed:stuff:1", S1), 1.0, settings(), arrivals=[5.0, 500.0])
    assert [r.arrival_s for r in rows] == [5.0, 500.0]
    assert rows[1].latency_s == pytest.approx(250 / 200 + 8 * 0.1)   # alone: the trace is far apart
    with pytest.raises(ValueError, match="2 queries"):
        simulate(qs, SimSystem("fixed:stuff:1", S1), 1.0, settings(), arrivals=[1.0])
