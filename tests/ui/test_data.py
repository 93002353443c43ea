"""Loading, validating and aggregating result files (ui/data.py): the repo's real runs, and
broken copies of them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.ui.conftest import EVAL_RUN, REPO, SWEEP
from ui.data import (ORACLE, Filters, ResultFileError, discover, filter_options, filter_rows, frontier_keys,
                     load_result_set, query_type, rows_of, tradeoff_points)


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_discover_finds_the_repos_runs_and_sweeps():
    found = discover(REPO)
    assert EVAL_RUN in found and SWEEP in found
    assert all((p / "report.json").is_file() or (p / "records.jsonl").is_file() for p in found)


def test_eval_run_points_match_the_reports_own_summaries_and_frontier():
    report = json.loads((EVAL_RUN / "report.json").read_text())
    result = load_result_set(EVAL_RUN, "run")
    assert result.kind == "eval run" and result.dataset == "squad"
    points = {p.name: p for p in tradeoff_points(result.rows, "system", "quality")}
    assert set(points) == set(report["systems"])
    for name, summary in report["systems"].items():
        assert points[name].num == summary["num"]
        assert points[name].quality == pytest.approx(summary["quality"], abs=1e-3)
        assert points[name].latency_s == pytest.approx(summary["total_s"]["mean"], abs=1e-3)
    assert [p.name for p in points.values() if p.on_frontier] == report["pareto_frontier"]


def test_eval_rows_get_their_questions_and_types_from_the_dataset():
    result = load_result_set(EVAL_RUN)
    assert all(r.question for r in result.rows)
    assert {r.query_type for r in result.rows} <= {"what", "which", "who", "when", "where", "why", "how", "other"}


def test_sweep_points_match_its_summary():
    summary = json.loads((SWEEP / "summary.json").read_text())
    result = load_result_set(SWEEP, "sweep")
    assert result.kind == "tuning sweep"
    by_plan = {p.name: p for p in tradeoff_points(result.rows, "plan", "f1")}
    by_system = {p.name: p for p in tradeoff_points(result.rows, "system", "f1")}
    assert set(by_system) == set(summary["plans"]) and ORACLE in by_system
    assert by_system[ORACLE].kind == "oracle" and ORACLE not in by_plan
    for system, s in summary["plans"].items():
        point = by_system[system]
        assert point.num == s["num"]
        assert point.f1 == pytest.approx(s["f1"], abs=1e-3)
        assert point.latency_s == pytest.approx(s["total_s"]["mean"], abs=1e-3)
        if system != ORACLE:
            assert by_plan[system.removeprefix("fixed:")].f1 == point.f1


def test_points_carry_their_plans_and_example_queries():
    result = load_result_set(EVAL_RUN)
    metis = next(p for p in tradeoff_points(result.rows) if p.name == "metis")
    assert sum(n for _, n in metis.plans) == metis.num - metis.num_errors
    assert 1 <= len(metis.examples) <= 3
    assert set(metis.examples) <= {r.question for r in result.rows}
    assert len(rows_of(result.rows, metis)) == metis.num


def test_filters_keep_matching_rows_and_the_frontier_follows():
    rows = list(load_result_set(EVAL_RUN).rows) + list(load_result_set(SWEEP).rows)
    options = filter_options(rows)
    assert options["datasets"] == ["squad"] and "stuff" in options["methods"]
    stuff = filter_rows(rows, Filters(methods=frozenset({"stuff"}), num_chunks=frozenset({1, 2})))
    assert stuff and all(r.method == "stuff" and r.num_chunks in (1, 2) for r in stuff)
    qtype = options["query_types"][0]
    assert all(r.query_type == qtype for r in filter_rows(rows, Filters(query_types=frozenset({qtype}))))
    assert filter_rows(rows, Filters(datasets=frozenset({"qmsum"}))) == []
    points = tradeoff_points(stuff, "plan")
    assert {p.name for p in points} <= {"stuff:1", "stuff:2"}
    assert [p.key for p in points if p.on_frontier] == frontier_keys(points)


def test_frontier_drops_dominated_and_unanswered_points():
    from ui.data import TradeoffPoint

    def point(name: str, latency: float | None, f1: float) -> TradeoffPoint:
        return TradeoffPoint(name, "s", "d", name, "fixed", (), 1, 0, f1, f1, latency, ())

    points = [point("fast", 1.0, 0.2), point("slow-better", 5.0, 0.6), point("dominated", 6.0, 0.5),
              point("tie-slower", 2.0, 0.2), point("failed", None, 0.9)]
    assert frontier_keys(points) == ["fast", "slow-better"]


def test_query_type_prefers_the_datasets_field_then_the_wh_word():
    assert query_type({"type": "comparison"}, "Who is older?") == "comparison"
    assert query_type({"query_type": "general"}, "Summarize the meeting") == "general"
    assert query_type(None, "In which year did it end?") == "which"
    assert query_type(None, "Whose idea was it?") == "who"
    assert query_type(None, "Summarize the meeting") == "other"
    assert query_type(None, "") == "unknown"


# ---------------------------------------------------------------------------- malformed files

def test_missing_directory_and_non_result_directory(tmp_path):
    with pytest.raises(ResultFileError, match="no such directory"):
        load_result_set(tmp_path / "nope")
    with pytest.raises(ResultFileError, match="not a ragserve result"):
        load_result_set(tmp_path)


def test_invalid_json_names_the_file_and_position(tmp_path):
    run = copy_run(EVAL_RUN, tmp_path)
    (run / "report.json").write_text('{"format_version": 1, "meta": {')
    with pytest.raises(ResultFileError) as info:
        load_result_set(run)
    assert info.value.path == run / "report.json" and "not valid JSON" in str(info.value)
    assert str(run / "report.json") in str(info.value)


def test_bad_row_names_the_line_and_field(tmp_path):
    run = copy_run(EVAL_RUN, tmp_path)
    lines = (run / "rows.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["quality"] = "high"
    lines[2] = json.dumps(row)
    (run / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultFileError, match=r"line 3: field 'quality' must be a number, got 'high'"):
        load_result_set(run)
    del row["system"]
    lines[2] = json.dumps(row)
    (run / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultFileError, match=r"line 3: field 'system' is missing"):
        load_result_set(run)
    lines[2] = "{not json"
    (run / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultFileError, match="line 3 is not valid JSON"):
        load_result_set(run)


def test_missing_rows_file_and_unknown_version(tmp_path):
    run = copy_run(EVAL_RUN, tmp_path)
    (run / "rows.jsonl").unlink()
    with pytest.raises(ResultFileError, match="file is missing") as info:
        load_result_set(run)
    assert info.value.path.name == "rows.jsonl"
    sweep = copy_run(SWEEP, tmp_path)
    meta = json.loads((sweep / "meta.json").read_text())
    (sweep / "meta.json").write_text(json.dumps({**meta, "format_version": 9}))
    with pytest.raises(ResultFileError, match="format_version 9 is not supported"):
        load_result_set(sweep)


def test_sweep_skips_a_cut_off_last_line_but_not_a_broken_middle_one(tmp_path):
    sweep = copy_run(SWEEP, tmp_path)
    records = sweep / "records.jsonl"
    text = records.read_text()
    records.write_text(text + '{"query_id": "x", "plan": {"meth')   # a killed sweep's last line
    rows = load_result_set(sweep).rows
    assert len([r for r in rows if r.system != ORACLE]) == len(text.splitlines())
    lines = text.splitlines()
    records.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(ResultFileError, match="line 2 must be a JSON object"):
        load_result_set(sweep)
