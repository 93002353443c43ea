"""Query bodies -> decision, stage timings and explanations (ui/outcome.py)."""
from __future__ import annotations

import pytest

from ui.outcome import STAGES, explain, outcome, plan_info, profile_rows, stage_breakdown

DONE = {  # the shape of a /v1/query response under METIS
    "answer": "October 1973", "plan": {"method": "stuff", "num_chunks": 2, "intermediate_tokens": 0},
    "profile": {"complexity": "low", "joint_reasoning": True, "pieces": 1, "summary_range": [30, 60],
                "confidence": 0.93, "source": "learned"},
    "decision": {"pruned": [{"method": "stuff", "num_chunks": 1, "intermediate_tokens": 0},
                            {"method": "stuff", "num_chunks": 2, "intermediate_tokens": 0},
                            {"method": "map_reduce", "num_chunks": 3, "intermediate_tokens": 48}],
                 "fallback": "stuff", "from_history": False, "reason": "fit", "kv_free_tokens": 12345,
                 "cost": {"est_latency_s": 1.5}},
    "chunks": [{"id": "d#0", "doc_id": "d", "title": "Oil", "score": 0.71, "text": "The 1973 oil crisis"}],
    "timings": {"retrieve_s": 0.1, "profile_s": 0.2, "queue_s": 0.3, "ttft_s": 1.6, "total_s": 2.5},
    "tokens": {"prompt": 300, "output": 5}, "num_calls": 1,
}


def test_stages_add_up_to_the_total():
    stages = stage_breakdown(DONE["timings"])
    assert [s for s, _ in stages] == list(STAGES)
    assert dict(stages)["prefill (TTFT)"] == pytest.approx(1.0)
    assert dict(stages)["decode"] == pytest.approx(0.9)
    assert sum(v for _, v in stages) == pytest.approx(2.5)


def test_stages_never_go_negative():
    stages = stage_breakdown({"retrieve_s": 0.5, "queue_s": 0.5, "ttft_s": 0.8, "total_s": 0.9})
    assert all(v >= 0 for _, v in stages)


def test_decision_of_a_metis_query():
    result = outcome("When?", DONE, label="A")
    info = result.info
    assert info.plan == "stuff:2" and info.pruned == ("stuff:1", "stuff:2", "map_reduce:3:48")
    assert info.reason == "fit" and info.kv_free_tokens == 12345 and info.est_latency_s == 1.5
    assert info.chunks[0].score == pytest.approx(0.71)
    assert result.prompt_tokens == 300 and result.num_calls == 1 and result.label == "A"
    text = explain(info)
    assert "stuff:2" in text and "12,345 free KV tokens" in text
    assert ("summary_range", "30–60") in profile_rows(info.profile)


def test_a_given_plan_is_explained_as_given():
    body = {**DONE, "profile": None, "decision": {}}
    info = plan_info(body)
    assert info.reason is None and info.pruned == () and profile_rows(info.profile) == []
    assert "fixed by the request" in explain(info)


def test_fallback_and_low_confidence_are_explained():
    body = {**DONE, "decision": {**DONE["decision"], "reason": "fallback", "from_history": True}}
    text = explain(plan_info(body))
    assert "fell back" in text and "union of recent pruned spaces" in text
