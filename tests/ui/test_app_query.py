"""Try-a-query and Compare under AppTest, against the in-process controller (SmolLM2) and a
real `ragserve serve`; and the messages when the server is down."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import COLLECTION, free_port
from tests.ui.conftest import QUERY_TIMEOUT_S, QUESTION
from ui.registry import http_backend, monitor_for
from ui.outcome import STAGES

pytestmark = pytest.mark.model

IN_PROCESS = "in-process controller"


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def stage_chart(at, tab: int) -> dict:
    charts = [json.loads(c.proto.spec) for c in at.tabs[tab].get("plotly_chart")]
    return next(c for c in charts if [t["name"] for t in c["data"]] == list(STAGES))


def test_in_process_metis_query_shows_decision_timings_answer_and_chunks(app, inprocess, small_squad):
    at = app()
    at.radio(key="mode").set_value(IN_PROCESS).run()
    assert "in-process controller ready" in [s.value for s in at.sidebar.success]
    at.selectbox(key="query_collection").set_value(small_squad)
    at.text_area(key="query_question").input(QUESTION)
    at.button(key="query_ask").click().run(timeout=QUERY_TIMEOUT_S)
    assert not at.exception and not at.tabs[1].error
    m = metrics(at)
    assert m["Why"] in ("fit", "slo", "fallback")
    plan = m["Chosen plan"]
    text = " ".join(x.value for x in at.tabs[1].markdown)
    assert f"METIS chose {plan}" in text and "free KV tokens" in text
    assert f"`{plan}` ← chosen" in text                       # among the pruned plans
    profile = at.tabs[1].table[0].value
    assert "complexity" in list(profile["dimension"])
    assert float(m["Total"].removesuffix(" s")) > 0
    stages = stage_chart(at, 1)
    assert sum(sum(t["x"]) for t in stages["data"]) > 0
    chunks = at.tabs[1].dataframe[-1].value
    assert len(chunks) == int(plan.split(":")[1]) and (chunks["score"] > 0).all()
    last = at.session_state["query_last"]
    assert last.answer.strip() and last.info.plan == plan
    assert last.answer in [x.value for x in at.tabs[1].markdown]


def test_in_process_compare_two_plans_side_by_side(app, inprocess, small_squad):
    at = app()
    at.radio(key="mode").set_value(IN_PROCESS).run()
    at.selectbox(key="cmp_collection").set_value(small_squad)
    at.text_area(key="cmp_question").input(QUESTION)
    at.text_input(key="cmp_reference").input("1973 | October 1973")
    at.selectbox(key="cmp_plan_B").set_value("stuff:2")
    at.button(key="cmp_run").click().run(timeout=QUERY_TIMEOUT_S)
    assert not at.exception and not at.tabs[2].error
    table = at.tabs[2].table[0].value
    assert list(table.columns) == ["measure", "A: stuff:1", "B: stuff:2"]
    row = dict(zip(table["measure"], zip(table["A: stuff:1"], table["B: stuff:2"])))
    assert row["plan"] == ("stuff:1", "stuff:2") and row["why"] == ("given", "given")
    assert all(0.0 <= float(f1) <= 1.0 for f1 in row["F1 vs reference"])
    assert all(float(s) > 0 for s in row["total s"]) and all(row["answer"])
    assert [bar for bar in stage_chart(at, 2)["data"][0]["y"]] == ["A: stuff:1", "B: stuff:2"]
    assert any("the time of A" in c.value for c in at.tabs[2].caption)


def test_in_process_compare_cacheblend_on_and_off(app, inprocess, small_squad):
    at = app()
    at.radio(key="mode").set_value(IN_PROCESS).run()
    at.selectbox(key="cmp_collection").set_value(small_squad)
    at.text_area(key="cmp_question").input(QUESTION)
    for side in "AB":
        at.selectbox(key=f"cmp_plan_{side}").set_value("stuff:2")
    at.toggle(key="cmp_blend_B").set_value(True)
    at.button(key="cmp_run").click().run(timeout=QUERY_TIMEOUT_S)
    assert not at.exception and not at.tabs[2].error
    table = at.tabs[2].table[0].value
    assert list(table.columns) == ["measure", "A: stuff:2", "B: stuff:2 + CacheBlend"]
    answers = dict(zip(table["measure"], zip(table["A: stuff:2"], table["B: stuff:2 + CacheBlend"])))["answer"]
    assert all(a.strip() for a in answers)
    blend_engine = inprocess.controller(True).engine
    assert blend_engine.blend_counters["blended_calls"] >= 1   # B really prefilled from chunk KV


def test_server_query_with_a_fixed_plan(app, ui_server):
    at = app()
    at.text_input(key="server_url").set_value(ui_server.url).run()
    assert f"{ui_server.url}: ready" in [s.value for s in at.sidebar.success]
    at.selectbox(key="query_collection").set_value(COLLECTION)
    at.text_area(key="query_question").input(QUESTION)
    at.selectbox(key="query_plan").set_value("stuff:2")
    at.button(key="query_ask").click().run(timeout=QUERY_TIMEOUT_S)
    assert not at.exception and not at.tabs[1].error
    m = metrics(at)
    assert m["Chosen plan"] == "stuff:2" and m["Why"] == "given"
    assert any("fixed by the request" in x.value for x in at.tabs[1].markdown)
    assert len(at.tabs[1].dataframe[-1].value) == 2
    assert at.session_state["query_last"].answer.strip()
    # The live tab samples the server's /v1/stats.
    samples = monitor_for(http_backend(ui_server.url)).samples()
    assert samples and samples[-1].kv_capacity_tokens > 0 and not at.tabs[3].error
    # CacheBlend is a server setting: without a blend server, Compare says what to do.
    at.selectbox(key="cmp_collection").set_value(COLLECTION)
    at.text_area(key="cmp_question").input(QUESTION)
    at.selectbox(key="cmp_plan_B").set_value("stuff:1")
    at.toggle(key="cmp_blend_B").set_value(True)
    at.button(key="cmp_run").click().run(timeout=QUERY_TIMEOUT_S)
    assert not at.exception
    (error,) = at.tabs[2].error
    assert "CacheBlend server URL" in error.value


def test_server_down_is_a_clear_message_in_every_tab(app):
    url = f"http://127.0.0.1:{free_port()}"
    at = app()
    at.text_input(key="server_url").set_value(url).run()
    assert not at.exception
    assert any("not reachable" in e.value for e in at.sidebar.error)
    for tab in at.tabs[1:]:
        (error,) = tab.error
        assert f"Cannot reach the ragserve server at {url}" in error.value and "ragserve serve" in error.value
