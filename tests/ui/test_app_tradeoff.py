"""The Trade-off tab under Streamlit's AppTest, on the repo's real result files."""
from __future__ import annotations

import json
import shutil

from tests.ui.conftest import EVAL_RUN, REPO, SWEEP
from ui.charts import FRONTIER_NAME
from ui.data import default_set, discover


def figure(at, index: int = 0) -> dict:
    """The plotly spec of the `index`-th chart of the page."""
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def widget(at, kind: str, label: str):
    """The `kind` widget labelled `label` (the filters' keys change with their options)."""
    return next(w for w in getattr(at, kind) if w.label == label)


def hover_texts(spec: dict) -> list[str]:
    return [t for trace in spec["data"] for t in trace.get("hovertext") or []]


BOTH = ["eval/results/smoke-squad", "profiles/smollm2/squad"]


def test_opens_on_one_set_and_draws_the_frontier(app):
    at = app()
    assert not at.exception and len(at.multiselect(key="tr_sources").value) == 1
    # the largest (then newest) set, not the 5-query SmolLM2 sweep
    assert at.multiselect(key="tr_sources").value == [str(default_set(discover(REPO)).relative_to(REPO))]
    assert at.multiselect(key="tr_sources").value[0] not in BOTH
    assert set(BOTH) <= set(at.multiselect(key="tr_sources").options)
    assert at.get("plotly_chart")


def test_loads_both_real_sets_and_draws_the_frontier(app):
    at = app()
    at.multiselect(key="tr_sources").set_value(BOTH).run()
    assert not at.exception
    spec = figure(at)
    names = [trace["name"] for trace in spec["data"]]
    assert FRONTIER_NAME in names and "metis" in names and "per-query best plan (oracle)" in names
    frontier = next(t for t in spec["data"] if t["name"] == FRONTIER_NAME)
    assert len(frontier["x"]) >= 1 and frontier["x"] == sorted(frontier["x"])
    # Hovering shows the plan and example queries.
    metis = next(t for t in hover_texts(spec) if t.startswith("<b>metis</b>"))
    assert "plan: " in metis and "examples:" in metis and "What did Pope Leo X launch against Luther?" in metis


def test_one_eval_run_has_the_reports_frontier(app):
    at = app()
    at.multiselect(key="tr_sources").set_value(["eval/results/smoke-squad"]).run()
    report = json.loads((EVAL_RUN / "report.json").read_text())
    frontier = next(t for t in figure(at)["data"] if t["name"] == FRONTIER_NAME)
    assert len(frontier["x"]) == len(report["pareto_frontier"])
    text = " ".join(m.value for m in at.markdown)
    assert all(f"`{name}`" in text for name in report["pareto_frontier"])
    # The inspect table opens on a frontier point and lists its queries.
    assert at.selectbox(key="tr_inspect").value.endswith(report["pareto_frontier"][0])
    rows = at.tabs[0].dataframe[-1].value
    assert len(rows) == report["systems"][report["pareto_frontier"][0]]["num"] and rows["question"].all()


def test_filters_and_grouping_by_plan(app):
    at = app()
    # Render with both sets first: the filters' options (and keys) follow the chosen sets.
    at.multiselect(key="tr_sources").set_value(BOTH).run()
    widget(at, "multiselect", "Method").set_value(["stuff"]).run()
    spec = figure(at)
    fixed = next(t for t in spec["data"] if t["name"] == "fixed plan")
    assert fixed["text"] and all(label.startswith("stuff:") for label in fixed["text"])
    at.radio(key="tr_group").set_value("plan").run()
    spec = figure(at)
    assert {t["name"] for t in spec["data"]} <= {"plan", FRONTIER_NAME}
    assert all(label.startswith("stuff:") for t in spec["data"] if t["name"] == "plan" for label in t["text"])
    qtypes = widget(at, "multiselect", "Query type")
    at = qtypes.set_value(qtypes.value[:1]).run()
    assert not at.exception and at.get("plotly_chart")


def test_a_malformed_result_file_is_reported_by_name(app, tmp_path):
    broken = tmp_path / "broken-run"
    shutil.copytree(EVAL_RUN, broken)
    (broken / "rows.jsonl").write_text('{"id": "x", "system": "metis"\n')
    at = app()
    at.multiselect(key="tr_sources").set_value(BOTH)
    at.text_input(key="tr_extra").input(str(broken)).run()
    assert not at.exception
    (error,) = at.tabs[0].error
    assert str(broken / "rows.jsonl") in error.value and "line 1 is not valid JSON" in error.value
    assert at.get("plotly_chart"), "the other sets still load"
    at.text_input(key="tr_extra").input(str(tmp_path / "missing")).run()
    assert "no such directory" in at.tabs[0].error[0].value


def test_only_a_broken_set_shows_the_error_and_no_chart(app, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(SWEEP, sweep)
    (sweep / "meta.json").write_text("[]")
    at = app()
    at.multiselect(key="tr_sources").set_value([])
    at.text_input(key="tr_extra").input(str(sweep)).run()
    assert not at.exception
    (error,) = at.tabs[0].error
    assert str(sweep / "meta.json") in error.value and "must hold a JSON object" in error.value
    assert not at.get("plotly_chart")
