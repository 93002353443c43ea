import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import ConfigError
from ragserve.metis.feedback import GOLDEN_PLAN, FeedbackLoop
from ragserve.metis.llm_profiler import ProfilePromptBuilder
from tests.metis.factories import make_cost_model, make_model_spec, make_profile, make_result

BUILDER = ProfilePromptBuilder("Meeting transcripts (QMSum)", chunk_tokens=256)


def test_golden_run_every_30_queries_by_default():
    loop = FeedbackLoop()
    due = [i for i in range(1, 91) if loop.record_query()]
    assert due == [30, 60, 90]


def test_cadence_is_configurable():
    loop = FeedbackLoop(every_n=3)
    assert [loop.record_query() for _ in range(6)] == [False, False, True, False, False, True]


def test_golden_plan_is_map_reduce_30_chunks_300_tokens_capped_by_collection():
    loop = FeedbackLoop()
    assert GOLDEN_PLAN == RagPlan(Method.MAP_REDUCE, 30, 300)
    assert loop.golden_plan(max_chunks=100) == GOLDEN_PLAN
    assert loop.golden_plan(max_chunks=12) == RagPlan(Method.MAP_REDUCE, 12, 300)


def test_golden_plan_is_the_most_expensive_that_fits():
    loop = FeedbackLoop()
    assert loop.golden_plan(30, lambda p: p.num_chunks <= 7) == RagPlan(Method.MAP_REDUCE, 7, 300)
    assert loop.golden_plan(30, lambda p: False) is None


def test_golden_plan_fits_the_default_context():
    """With default settings (8,192-token context, 256-token chunks) METIS' 30 x 300 prices
    above the context; the golden plan that runs must fit it, or the loop never teaches."""
    cost = make_cost_model(make_model_spec(max_context=8192), overhead_tokens_per_call=60,
                           overhead_tokens_per_chunk=8, answer_tokens=64)
    counts = [256] * 30

    def fits(plan: RagPlan) -> bool:
        return cost.estimate(plan, counts, 12).max_call_tokens <= 8192

    assert not fits(GOLDEN_PLAN)
    golden = FeedbackLoop().golden_plan(30, fits)
    assert golden is not None and golden.method is Method.MAP_REDUCE and golden.intermediate_tokens == 300
    assert fits(golden) and not fits(RagPlan(Method.MAP_REDUCE, golden.num_chunks + 1, 300))


def test_review_call_shows_query_answer_and_profile_used():
    loop = FeedbackLoop()
    used = make_profile("low", False, 1)
    call = loop.review_call(BUILDER, "Why did the team drop the remote?", "Because of cost. " * 200,
                            used)
    role, content = call.messages[-1]
    assert role == "user"
    assert "Why did the team drop the remote?" in content
    assert "Meeting transcripts (QMSum)" in content
    assert used.to_json() in content
    assert "Because of cost." in content and len(content) < 2500    # answer is cut
    assert call.logprobs and call.temperature == 0.0 and call.tag == "feedback"


def test_keeps_the_last_4_valid_examples_oldest_first():
    loop = FeedbackLoop(keep=4)
    for i in range(6):
        text = ('{"complexity": "high", "joint_reasoning": true, "pieces": %d, '
                '"summary_range": [50, 100]}' % (i + 1))
        assert loop.add_result(f"q{i}", make_result(text)) is not None
    assert loop.add_result("bad", make_result("no json here")) is None
    assert [e.query for e in loop.examples] == ["q2", "q3", "q4", "q5"]
    assert [e.profile.pieces for e in loop.examples] == [3, 4, 5, 6]


def test_examples_feed_the_profiler_prompt():
    loop = FeedbackLoop()
    review = '{"complexity": "low", "joint_reasoning": true, "pieces": 5, "summary_range": [30, 60]}'
    assert loop.add_result("earlier question", make_result(review)) is not None
    call = BUILDER.build("new question", loop.examples)
    assert call.messages[1] == ("user", BUILDER.user_turn("earlier question"))
    assert '"pieces": 5' in call.messages[2][1]


def test_bad_settings():
    with pytest.raises(ConfigError, match="every_n=0"):
        FeedbackLoop(every_n=0)
