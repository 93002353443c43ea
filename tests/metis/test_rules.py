import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, ConfigError
from ragserve.metis.profile import Complexity, QueryProfile, fallback_profile
from ragserve.metis.rules import ConfidenceGate, MethodRule, PlanPruner, PlannerRules, degenerate, prune
from tests.metis.factories import make_profile

RULES = PlannerRules()
TOKENS = PlannerRules(tokens_per_summary_unit=1.0)   # summary range taken as tokens


def methods(plans):
    return sorted({p.method.value for p in plans})


def chunk_counts(plans):
    return sorted({p.num_chunks for p in plans})


# ------------------------------------------------------------------ METIS rules

def test_no_joint_reasoning_gives_map_rerank_only():
    plans = prune(make_profile("high", joint=False, pieces=2), RULES, max_chunks=30)
    assert methods(plans) == ["map_rerank"]
    assert chunk_counts(plans) == [2, 3, 4, 5, 6]
    assert all(p.intermediate_tokens == 0 for p in plans)


def test_joint_low_complexity_gives_stuff():
    plans = prune(make_profile("low", joint=True, pieces=3), RULES, max_chunks=30)
    assert plans == [RagPlan(Method.STUFF, n) for n in range(3, 10)]


def test_joint_high_complexity_gives_stuff_and_map_reduce():
    plans = prune(make_profile("high", joint=True, pieces=3, summary=(30, 90)), TOKENS, 30)
    assert methods(plans) == ["map_reduce", "stuff"]
    assert chunk_counts(plans) == list(range(3, 10))
    reduce_plans = [p for p in plans if p.method is Method.MAP_REDUCE]
    assert sorted({p.intermediate_tokens for p in reduce_plans}) == [30, 60, 90]
    assert len(reduce_plans) == 7 * 3 and len(plans) == 7 * 4


def test_chunk_range_capped_by_collection_size():
    assert chunk_counts(prune(make_profile(pieces=3), RULES, max_chunks=5)) == [3, 4, 5]
    assert chunk_counts(prune(make_profile(pieces=4), RULES, max_chunks=2)) == [2]


def test_no_chunks_is_bad_input():
    with pytest.raises(BadInput, match="max_chunks=0"):
        prune(make_profile(), RULES, max_chunks=0)


def test_summary_words_become_tokens():
    # (30, 100) words * 1.3 = (39, 130) tokens; three values spread over it
    assert RULES.intermediate_values((30, 100)) == (39, 84, 130)
    assert PlannerRules(num_intermediate_values=1).intermediate_values((30, 100)) == (84,)
    assert RULES.intermediate_values((50, 50)) == (65,)


def test_largest_space_stays_small():
    plans = prune(make_profile("high", True, pieces=10, summary=(30, 200)), RULES, 100)
    assert len(plans) == 21 + 21 * 3


def test_refine_is_offered_only_when_configured():
    profile = make_profile("high", joint=True)
    assert "refine" not in methods(prune(profile, RULES, 30))
    with_refine = prune(profile, PlannerRules(offer_refine=True), 30)
    assert methods(with_refine) == ["map_reduce", "refine", "stuff"]
    assert all(p.intermediate_tokens > 0 for p in with_refine if p.method is Method.REFINE)
    # not where map_reduce is not offered
    assert methods(prune(make_profile("low", True), PlannerRules(offer_refine=True), 30)) == ["stuff"]


# ------------------------------------------------------------------ rules as data

def test_rules_from_a_mapping():
    rules = PlannerRules.from_dict({
        "rules": [{"when": {"joint_reasoning": False}, "methods": ["map_rerank", "stuff"]},
                  {"methods": ["map_reduce"]}],
        "max_chunks_factor": 2,
    })
    assert methods(prune(make_profile(joint=False, pieces=3), rules, 30)) == ["map_rerank", "stuff"]
    plans = prune(make_profile(joint=True, pieces=3), rules, 30)
    assert methods(plans) == ["map_reduce"] and chunk_counts(plans) == [3, 4, 5, 6]


def test_rules_from_yaml(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("offer_refine: true\nrules:\n"
                    "  - when: {complexity: High}\n    methods: [map_reduce]\n"
                    "  - methods: [stuff]\n")
    rules = PlannerRules.load(path)
    assert rules.offer_refine
    assert rules.rules[0] == MethodRule((Method.MAP_REDUCE,), complexity=Complexity.HIGH)
    assert methods(prune(make_profile("low"), rules, 30)) == ["stuff"]


@pytest.mark.parametrize("raw, match", [
    ({"rules": [{"methods": ["summarize"]}]}, "summarize"),
    ({"rules": [{"when": {"mood": "x"}, "methods": ["stuff"]}]}, "mood"),
    ({"rules": [{"when": {"joint_reasoning": "maybe"}, "methods": ["stuff"]}]}, "maybe"),
    ({"rules": []}, "non-empty"),
    ({"chunk_factor": 2}, "chunk_factor"),
    ({"min_chunks_factor": 4}, "min=4"),
])
def test_bad_rules_name_the_value(raw, match):
    with pytest.raises(ConfigError, match=match):
        PlannerRules.from_dict(raw)


def test_profile_matching_no_rule_is_a_config_error():
    rules = PlannerRules.from_dict({"rules": [{"when": {"joint_reasoning": True}, "methods": ["stuff"]}]})
    with pytest.raises(ConfigError, match="no planner rule matches"):
        prune(make_profile(joint=False), rules, 30)


# ------------------------------------------------------------------ confidence gate

def test_confident_profile_uses_its_own_space():
    planner = PlanPruner()
    space = planner.plan(make_profile("low", True, pieces=2, confidence=0.95), 30)
    assert not space.from_history
    assert space.plans == tuple(RagPlan(Method.STUFF, n) for n in range(2, 7))
    assert space.fallback is Method.STUFF


def test_low_confidence_uses_the_union_of_the_last_10():
    planner = PlanPruner()
    # 11 confident queries; the first (pieces=10) must be forgotten
    planner.plan(make_profile("low", True, pieces=10), 30)
    for _ in range(9):
        planner.plan(make_profile("low", True, pieces=1), 30)
    planner.plan(make_profile("high", False, pieces=2), 30)
    space = planner.plan(make_profile("high", True, pieces=7, confidence=0.5), 30)
    assert space.from_history
    assert set(space.plans) == ({RagPlan(Method.STUFF, n) for n in range(1, 4)}
                                | {RagPlan(Method.MAP_RERANK, n) for n in range(2, 7)})
    assert space.fallback is Method.STUFF          # the union offers a joint method
    # the low-confidence space was not remembered
    assert planner.gate.num_remembered == 10


def test_low_confidence_without_history_gets_the_safe_space():
    # The Mount Kelby case: a 0.80-confidence "high complexity, joint reasoning" profile with
    # no history used to plan map_reduce over the one chunk there was.
    wrong = QueryProfile(Complexity.HIGH, True, 1, (30, 50), confidence=0.8)
    for profile in (fallback_profile(), wrong):
        space = PlanPruner().plan(profile, 30)
        assert not space.from_history
        assert [str(p) for p in space.plans] == ["stuff:1", "stuff:2", "stuff:3"]
        assert space.fallback is Method.STUFF
    assert [str(p) for p in PlanPruner().plan(wrong, 1).plans] == ["stuff:1"]


def test_degenerate_plans_are_never_offered():
    confident = QueryProfile(Complexity.HIGH, True, 1, (30, 50), confidence=1.0)
    plans = prune(confident, PlannerRules(), 1)
    assert [str(p) for p in plans] == ["stuff:1"]
    plans = prune(confident, PlannerRules(offer_refine=True), 3)
    assert not any(degenerate(p) for p in plans)
    assert {p.method for p in plans} == {Method.STUFF, Method.MAP_REDUCE, Method.REFINE}
    assert min(p.num_chunks for p in plans if p.method is Method.MAP_REDUCE) == 2


def test_union_respects_the_current_collection_size():
    planner = PlanPruner()
    planner.plan(make_profile("high", False, pieces=5), 30)          # map_rerank 5..15
    space = planner.plan(make_profile(confidence=0.1), max_chunks=8)
    assert chunk_counts(space.plans) == [5, 6, 7, 8]
    assert space.fallback is Method.MAP_RERANK


def test_threshold_is_configurable():
    gate = ConfidenceGate(threshold=0.5, history_size=2)
    assert gate.is_confident(make_profile(confidence=0.6))
    assert not gate.is_confident(make_profile(confidence=0.4))
    planner = PlanPruner(PlannerRules(confidence_threshold=0.5))
    assert not planner.plan(make_profile(confidence=0.6), 30).from_history


def test_rules_file_and_metis_section_share_confidence_threshold_and_offer_refine(tmp_path):
    """One owner per setting: set in one place it holds; set in both, the values must agree."""
    from ragserve.config import MetisConfig

    path = tmp_path / "rules.yaml"
    path.write_text("confidence_threshold: 0.5\n")
    assert PlannerRules.from_config(MetisConfig(rules_file=str(path))).confidence_threshold == 0.5
    assert PlannerRules.from_config(MetisConfig(rules_file=str(path), confidence_threshold=0.5)).confidence_threshold == 0.5
    assert PlannerRules.from_config(MetisConfig(confidence_threshold=0.7)).confidence_threshold == 0.7
    assert PlannerRules.from_config(MetisConfig()) == PlannerRules()
    with pytest.raises(ConfigError, match=r"confidence_threshold=0.5 and the metis section sets confidence_threshold=0.8"):
        PlannerRules.from_config(MetisConfig(rules_file=str(path), confidence_threshold=0.8))
    refine = tmp_path / "refine.yaml"
    refine.write_text("offer_refine: false\n")
    with pytest.raises(ConfigError, match="offer_refine"):
        PlannerRules.from_config(MetisConfig(rules_file=str(refine), offer_refine=True))
    assert PlannerRules.from_config(MetisConfig(offer_refine=True)).offer_refine
