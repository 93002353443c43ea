import asyncio
import math

import pytest

from ragserve.errors import EngineDead, EngineUnavailable
from ragserve.metis.llm_profiler import ProfilePromptBuilder, confidence_from_logprobs, parse_profile, run_llm_profiler
from ragserve.metis.profile import Complexity, FeedbackExample, LearnedProfiler, ProfileSource, QueryProfile, fallback_profile
from tests.metis.factories import make_profile, make_result

BUILDER = ProfilePromptBuilder("Fortune 500 quarterly financial reports, 2023", chunk_tokens=256)
CLEAN = '{"complexity": "high", "joint_reasoning": true, "pieces": 4, "summary_range": [40, 120]}'


def parsed(text, logprobs=()):
    return parse_profile(make_result(text, logprobs))


# ------------------------------------------------------------------ parse_profile

def test_parses_clean_json():
    p = parsed(CLEAN)
    assert (p.complexity, p.joint_reasoning, p.pieces, p.summary_range) == (
        Complexity.HIGH, True, 4, (40, 120))
    assert p.source is ProfileSource.LLM


@pytest.mark.parametrize("text", [
    "```json\n" + CLEAN + "\n```",
    "Sure! Here is the profile:\n" + CLEAN + "\nLet me know if you need more.",
    CLEAN[:-1],                                    # stopped at "}" (stop string excluded)
    CLEAN[:-1] + ",",
    "{'complexity': 'High', 'joint_reasoning': 'Yes', 'pieces': '4', 'summary_range': '40-120',}",
    '{"Complexity": "HIGH", "Joint reasoning needed": True, "pieces_of_information": 4.2, '
    '"summary_length": "40 to 120 words"}',
    '{"query_complexity": "High", "joint_reasoning": "yes, across reports", "pieces": "4 pieces",'
    ' "summary_range": {"min": 40, "max": 120}}',
    "Complexity: High\nJoint reasoning: Yes\nPieces of information: 4\nSummary length: 40-120",
])
def test_parses_messy_outputs(text):
    p = parsed(text)
    assert p is not None, text
    assert (p.complexity, p.joint_reasoning, p.pieces, p.summary_range) == (
        Complexity.HIGH, True, 4, (40, 120))


def test_low_and_no_variants():
    p = parsed('{"complexity": "Low", "joint_reasoning": "No", "pieces": 1, "summary_range": [30, 50]}')
    assert p.complexity is Complexity.LOW and p.joint_reasoning is False
    p = parsed('{"complexity": "simple", "joint_reasoning": false, "pieces": 2}')
    assert p.complexity is Complexity.LOW and p.joint_reasoning is False


def test_clamps_and_orders():
    p = parsed('{"complexity": "high", "joint_reasoning": 1, "pieces": 42, "summary_range": [500, 10]}')
    assert p.pieces == 10 and p.summary_range == (30, 200)
    p = parsed('{"complexity": "high", "joint_reasoning": true, "pieces": 0, "summary_range": [90, 60]}')
    assert p.pieces == 1 and p.summary_range == (60, 90)
    p = parsed('{"complexity": "high", "joint_reasoning": true, "pieces": 3, "summary_range": 80}')
    assert p.summary_range == (80, 80)


def test_missing_summary_range_defaults_to_the_whole_range():
    p = parsed('{"complexity": "high", "joint_reasoning": true, "pieces": 3}')
    assert p.summary_range == (30, 200)


def test_braces_inside_strings_do_not_end_the_object():
    p = parsed('{"note": "a } and a \\" quote", "complexity": "low", '
               '"joint_reasoning": false, "pieces": 2}')
    assert p is not None and p.pieces == 2


@pytest.mark.parametrize("text", [
    "",
    "I cannot help with that.",
    '{"complexity": "medium", "joint_reasoning": true, "pieces": 3}',   # not high/low
    '{"complexity": "high", "joint_reasoning": "maybe", "pieces": 3}',
    '{"complexity": "high", "joint_reasoning": true}',                  # no pieces
    '{"complexity": "high", "joint_reasoning": true, "pieces": "several"}',
])
def test_invalid_outputs_give_none(text):
    assert parsed(text) is None


def test_confidence_is_the_geometric_mean_token_probability():
    p = parsed(CLEAN, logprobs=[-0.1, -0.2, 0.0])
    assert p.confidence == pytest.approx(math.exp(-0.1))
    assert confidence_from_logprobs([]) is None
    assert parsed(CLEAN).confidence == 1.0                      # no log-probs: cannot gate
    assert parse_profile(make_result(CLEAN), confidence_if_missing=0.5).confidence == 0.5
    assert parsed(CLEAN, logprobs=[-5.0] * 3).confidence < 0.9


# ------------------------------------------------------------------ QueryProfile

def test_profile_validates_and_serializes():
    with pytest.raises(ValueError, match="pieces=11"):
        make_profile(pieces=11)
    with pytest.raises(ValueError, match="summary_range"):
        make_profile(summary=(100, 50))
    p = make_profile("low", False, 2, (30, 60), confidence=0.93)
    assert p.to_dict() == {"complexity": "low", "joint_reasoning": False, "pieces": 2,
                           "summary_range": [30, 60], "confidence": 0.93, "source": "llm"}
    assert parsed(p.to_json()).to_dict()["pieces"] == 2     # the few-shot format parses back


def test_fallback_profile():
    p = fallback_profile()
    assert p.source is ProfileSource.FALLBACK and p.confidence == 0.0
    assert p.joint_reasoning and p.complexity is Complexity.LOW and p.pieces == 2


def test_learned_profiler_protocol():
    class Learned:
        def profile(self, query: str) -> QueryProfile:
            return make_profile(source=ProfileSource.LEARNED)

    assert isinstance(Learned(), LearnedProfiler)
    assert Learned().profile("q").to_dict()["source"] == "learned"


# ------------------------------------------------------------------ prompt

def test_call_carries_only_query_description_and_chunk_size():
    call = BUILDER.build("Which company had the highest Q3 revenue?")
    assert call.logprobs and call.temperature == 0.0 and call.max_tokens == 80
    assert call.stop == ("}",) and call.tag == "profile"
    role, content = call.messages[-1]
    assert role == "user"
    assert "Fortune 500 quarterly financial reports, 2023" in content
    assert "256 tokens" in content and "highest Q3 revenue" in content
    assert call.messages[0][0] == "system" and "joint_reasoning" in call.messages[0][1]
    assert len(call.messages) == 2


def test_feedback_examples_become_few_shot_turns():
    examples = [FeedbackExample(f"q{i}", make_profile(pieces=i + 1)) for i in range(4)]
    call = BUILDER.build("new question", examples)
    assert [r for r, _ in call.messages] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert "q0" in call.messages[1][1] and '"pieces": 1' in call.messages[2][1]


def test_retry_changes_the_prompt():
    call = BUILDER.build("q")
    retry = BUILDER.build_retry(call, "no idea")
    assert retry.messages[:len(call.messages)] == call.messages
    assert retry.messages[-2] == ("assistant", "no idea")
    assert retry.messages[-1][0] == "user" and retry.logprobs


# ------------------------------------------------------------------ async glue

class FakeEngine:
    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    async def generate(self, calls):
        self.calls.append(calls[0])
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return [make_result(outcome, [-0.01] * 5)]


def run(engine, examples=()):
    return asyncio.run(run_llm_profiler(engine, BUILDER, "q", examples))


def test_run_profiler_first_try():
    engine = FakeEngine(CLEAN)
    p = run(engine)
    assert p.pieces == 4 and p.confidence == pytest.approx(math.exp(-0.01))
    assert len(engine.calls) == 1


def test_run_profiler_retries_once_with_a_changed_prompt():
    engine = FakeEngine("gibberish", CLEAN)
    assert run(engine).pieces == 4
    assert len(engine.calls) == 2 and engine.calls[1].messages != engine.calls[0].messages


def test_run_profiler_falls_back_after_the_retry():
    engine = FakeEngine("gibberish", "still gibberish", CLEAN)
    assert run(engine).source is ProfileSource.FALLBACK
    assert len(engine.calls) == 2


def test_run_profiler_falls_back_when_the_engine_is_unavailable():
    assert run(FakeEngine(EngineUnavailable("down"))).source is ProfileSource.FALLBACK


def test_run_profiler_propagates_a_dead_engine():
    with pytest.raises(EngineDead):
        run(FakeEngine(EngineDead("gone")))
