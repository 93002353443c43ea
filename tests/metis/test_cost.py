import math

import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, ConfigError
from ragserve.metis.cost import CostConfig, CostModel
from tests.metis.factories import QWEN, SMOLLM2, make_cost_model, make_model_spec

CHUNKS = [100, 200, 300]   # ranked: a plan with n chunks uses the first n
Q = 10                     # question tokens; base per call = Q + 20 overhead = 30


def test_kv_bytes_per_token_from_model_geometry():
    assert SMOLLM2.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23_040
    assert QWEN.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2 == 12_288
    assert make_model_spec("smollm2", dtype_bytes=4).kv_bytes_per_token == 46_080


def test_stuff_counts_prompt_plus_answer_with_buffer():
    cost = make_cost_model().estimate(RagPlan(Method.STUFF, 2), CHUNKS, Q)
    assert cost.prompt_tokens == 30 + 100 + 200
    assert cost.kv_tokens == 330 + 30
    assert cost.kv_budget_tokens == math.ceil(360 * 1.02) == 368
    assert cost.kv_bytes == 368 * 23_040
    assert (cost.num_calls, cost.num_rounds, cost.max_call_tokens) == (1, 1, 360)
    assert cost.est_latency_s == pytest.approx(330 / 2000 + 30 / 20)


def test_uses_the_first_n_ranked_chunks():
    model = make_cost_model()
    assert model.estimate(RagPlan(Method.STUFF, 1), [300, 100], Q).prompt_tokens == 330
    assert model.estimate(RagPlan(Method.STUFF, 1), [100, 300], Q).prompt_tokens == 130


def test_map_rerank_sums_the_fan_out():
    cost = make_cost_model().estimate(RagPlan(Method.MAP_RERANK, 3), CHUNKS, Q)
    assert cost.prompt_tokens == 3 * 30 + 600
    assert cost.kv_tokens == 690 + 3 * 30       # all maps resident at once
    assert cost.num_calls == 3 and cost.num_rounds == 1
    assert cost.max_call_tokens == 30 + 300 + 30
    assert cost.est_latency_s == pytest.approx(690 / 2000 + 30 / 20)


def test_map_reduce_peak_is_the_larger_phase():
    cost = make_cost_model().estimate(RagPlan(Method.MAP_REDUCE, 3, 50), CHUNKS, Q)
    maps_kv = 3 * 30 + 600 + 3 * 50           # 840
    reduce_prompt = 30 + 3 * 50               # 180
    assert cost.kv_tokens == max(maps_kv, reduce_prompt + 30) == 840
    assert cost.prompt_tokens == 690 + 180
    assert cost.output_tokens == 3 * 50 + 30
    assert (cost.num_calls, cost.num_rounds) == (4, 2)
    assert cost.max_call_tokens == 30 + 300 + 50
    assert cost.est_latency_s == pytest.approx(690 / 2000 + 50 / 20 + 180 / 2000 + 30 / 20)


def test_map_reduce_reduce_phase_can_dominate():
    # a tiny chunk and a long summary: the reduce call (prompt + answer) is the peak
    cost = make_cost_model().estimate(RagPlan(Method.MAP_REDUCE, 1, 300), [10], Q)
    assert cost.kv_tokens == 30 + 300 + 30 > 30 + 10 + 300


def test_map_reduce_without_intermediate_uses_the_default():
    model = make_cost_model()
    assert (model.estimate(RagPlan(Method.MAP_REDUCE, 3), CHUNKS, Q)
            == model.estimate(RagPlan(Method.MAP_REDUCE, 3, 50), CHUNKS, Q))


def test_refine_is_sequential_so_the_peak_is_one_call():
    cost = make_cost_model().estimate(RagPlan(Method.REFINE, 3, 50), CHUNKS, Q)
    # prompts: 30+100, 30+200+50, 30+300+50; outputs 50, 50 and the answer (30)
    assert cost.kv_tokens == 380 + 30
    assert cost.prompt_tokens == 130 + 280 + 380
    assert cost.output_tokens == 50 + 50 + 30
    assert (cost.num_calls, cost.num_rounds) == (3, 3)


def test_passage_headers_count_per_chunk_and_per_summary():
    model = make_cost_model(overhead_tokens_per_chunk=8)
    assert model.estimate(RagPlan(Method.STUFF, 3), CHUNKS, Q).prompt_tokens == 30 + 600 + 3 * 8
    cost = model.estimate(RagPlan(Method.MAP_REDUCE, 3, 50), CHUNKS, Q)
    assert cost.prompt_tokens == (3 * 30 + 600 + 3 * 8) + (30 + 3 * (50 + 8))


def test_buffer_has_no_float_artifacts():
    model = make_cost_model(overhead_tokens_per_call=0, answer_tokens=0)
    assert model.estimate(RagPlan(Method.STUFF, 1), [100], 0).kv_budget_tokens == 102


def test_per_call_overrides():
    model = make_cost_model()
    cost = model.estimate(RagPlan(Method.STUFF, 1), CHUNKS, Q, overhead_tokens_per_call=0,
                          answer_tokens=5)
    assert cost.kv_tokens == 10 + 100 + 5


@pytest.mark.parametrize("method", [Method.STUFF, Method.MAP_RERANK])
def test_fallback_methods_grow_with_chunks(method):
    # the scheduler's "as many chunks as fit" binary search relies on this
    model = make_cost_model()
    counts = [50, 400, 120, 80, 300, 10]
    costs = [model.estimate(RagPlan(method, n), counts, Q) for n in range(1, 7)]
    assert all(a.kv_budget_tokens < b.kv_budget_tokens for a, b in zip(costs, costs[1:]))
    assert all(a.max_call_tokens <= b.max_call_tokens for a, b in zip(costs, costs[1:]))


def test_more_chunks_than_retrieved_is_an_error():
    with pytest.raises(BadInput, match="needs 4 chunks; 3 retrieved"):
        make_cost_model().estimate(RagPlan(Method.STUFF, 4), CHUNKS, Q)


def test_calibrated_copy_changes_only_rates():
    model = make_cost_model()
    fast = model.calibrated(decode_tok_s=40.0)
    plan = RagPlan(Method.STUFF, 1)
    assert fast.config.prefill_tok_s == 2000.0
    assert fast.estimate(plan, CHUNKS, Q).est_latency_s < model.estimate(plan, CHUNKS, Q).est_latency_s
    assert fast.estimate(plan, CHUNKS, Q).kv_tokens == model.estimate(plan, CHUNKS, Q).kv_tokens


def test_bad_config_names_the_value():
    with pytest.raises(ConfigError, match="decode_tok_s=0"):
        CostModel(SMOLLM2, CostConfig(decode_tok_s=0))


def test_blended_stuff_prefills_a_share_of_the_chunks_and_holds_the_same_kv():
    plan = RagPlan(Method.STUFF, 3)
    plain = make_cost_model().estimate(plan, CHUNKS, Q)
    blended = make_cost_model(blend_prefill_fraction=0.15).estimate(plan, CHUNKS, Q)
    assert blended.kv_budget_tokens == plain.kv_budget_tokens   # the KV is held all the same
    assert plain.prefill_tokens == plain.prompt_tokens == 30 + 600
    assert blended.prefill_tokens == 30 + math.ceil(600 * 0.15)
    assert blended.est_latency_s < plain.est_latency_s


def test_a_stuff_call_under_the_blend_minimum_is_priced_as_a_full_prefill():
    small, large = RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 3)
    model = make_cost_model(blend_prefill_fraction=0.15, blend_min_tokens=256)
    assert model.estimate(small, CHUNKS, Q).prefill_tokens == 30 + 100   # 100 chunk tokens < 256: not blended
    assert model.estimate(large, CHUNKS, Q).prefill_tokens == 30 + math.ceil(600 * 0.15)


def test_a_query_can_carry_its_own_blend_fraction():
    plan, model = RagPlan(Method.STUFF, 3), make_cost_model(blend_prefill_fraction=0.15)
    assert model.estimate(plan, CHUNKS, Q, blend_fraction=1.0).prefill_tokens == 30 + 600   # the gate refused
    assert model.estimate(plan, CHUNKS, Q, blend_fraction=0.3).prefill_tokens == 30 + math.ceil(600 * 0.3)
    with pytest.raises(BadInput, match="blend_fraction=0"):
        model.estimate(plan, CHUNKS, Q, blend_fraction=0)


def test_blending_does_not_change_map_plans():
    cost = make_cost_model(blend_prefill_fraction=0.15).estimate(RagPlan(Method.MAP_RERANK, 3), CHUNKS, Q)
    assert cost.prefill_tokens == cost.prompt_tokens


def test_blend_fraction_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="blend_prefill_fraction=0"):
        CostModel(SMOLLM2, CostConfig(blend_prefill_fraction=0))
