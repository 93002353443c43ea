import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import ConfigError
from ragserve.metis.feedback import GOLDEN_PLAN, FeedbackLoop
from ragserve.metis.llm_profiler import ProfilePromptBuilder
from ragserve.metis.profile import FeedbackExample
from tests.metis.factories import make_profile, make_result

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
    loop.add_example(FeedbackExample("earlier question", make_profile(pieces=5)))
    call = BUILDER.build("new question", loop.examples)
    assert call.messages[1] == ("user", BUILDER.user_turn("earlier question"))
    assert '"pieces": 5' in call.messages[2][1]


def test_bad_settings():
    with pytest.raises(ConfigError, match="every_n=0"):
        FeedbackLoop(every_n=0)
