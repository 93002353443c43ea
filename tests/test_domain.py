"""RagPlan read back from text and dicts in one place (CLI, HTTP, tuning files, the explorer)."""
from __future__ import annotations

import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput


@pytest.mark.parametrize("plan", [RagPlan(Method.STUFF, 4), RagPlan(Method.MAP_REDUCE, 6, 64),
                                  RagPlan(Method.REFINE, 1, 1024), RagPlan(Method.MAP_RERANK, 30)])
def test_text_and_dict_round_trip(plan):
    assert RagPlan.parse(str(plan)) == plan
    assert RagPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("text, needle", [
    ("stuff:٣", "digits 0-9"),            # Arabic-Indic three: int() would read it as 3
    ("stuff:３", "digits 0-9"),           # fullwidth three
    ("map_reduce:6:６４", "digits 0-9"),
    ("stuff:-1", "digits 0-9"),
    ("stuff:0", "num_chunks must be >= 1"),
    ("map_reduce:4:2000", "intermediate_tokens must be in [0, 1024]"),
    ("stuff", "METHOD:NUM_CHUNKS"),
    ("magic:4", "unknown synthesis method"),
])
def test_bad_plans_name_the_problem(text, needle):
    with pytest.raises(BadInput) as info:
        RagPlan.parse(text)
    assert needle in str(info.value)


def test_from_dict_rejects_what_parse_rejects():
    with pytest.raises(BadInput, match="integers"):
        RagPlan.from_dict({"method": "stuff", "num_chunks": "٣"})
    with pytest.raises(BadInput, match="num_chunks must be >= 1"):
        RagPlan.from_dict({"method": "stuff", "num_chunks": 0})
    with pytest.raises(BadInput, match="needs method and num_chunks"):
        RagPlan.from_dict({"method": "stuff"})


def test_one_json_shape_for_cli_and_http():
    from ragserve.domain import Chunk, PlanDecision, QueryResult, RetrievedChunk, Timings
    from ragserve.metis.cost import PlanCost
    from ragserve.metis.profile import Complexity, QueryProfile
    from ragserve.server.schemas import QueryResponse, query_response

    plan = RagPlan(Method.STUFF, 1)
    cost = PlanCost(100, 8, 108, 111, 1000, 108, 1, 1, 0.5, 100)
    decided = PlanDecision(plan, "fit", QueryProfile(Complexity.LOW, True, 1, (30, 60)), (plan,), Method.STUFF,
                           False, 5000, cost)
    hit = RetrievedChunk(Chunk("d#0", "d", "text", 1, title="T"), 0.9)
    result = QueryResult("q?", "a", plan, (hit,), Timings(total_s=1.0), 10, 2, 1, decided)
    body = result.to_dict()
    assert query_response(result) == body and set(body) == set(QueryResponse.model_fields)
    QueryResponse.model_validate(body)
    assert body["profile"]["complexity"] == "low" and body["decision"]["reason"] == "fit"
    assert body["decision"]["cost"]["kv_budget_tokens"] == 111 and body["decision"]["kv_free_tokens"] == 5000
    assert body["chunks"] == [{"id": "d#0", "doc_id": "d", "title": "T", "score": 0.9, "text": "text", "metadata": {}}]
    given = QueryResult("q?", "a", plan, (hit,), Timings(), 10, 2, 1)
    assert given.to_dict()["profile"] is None and given.to_dict()["decision"] == {}
