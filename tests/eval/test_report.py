"""Reports from synthetic rows: summaries, headline, Pareto frontier, JSON/MD/PNG files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from ragserve.eval.report import (build_report, headline, paired_diff, pareto_frontier, percentile, render_markdown,
                                  summarize, write_eval_report)
from ragserve.eval.systems import System
from tests.eval.factories import make_rows


@dataclass
class Run:   # the fields of ragserve.eval.runner.SystemRun the report reads
    system: System
    rows: list
    wall_s: float = 10.0
    extra: dict = field(default_factory=dict)


def test_percentile_and_summary():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 95) == 5
    rows = make_rows("metis", [1.0, 0.5, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0], errors=(2,))
    s = summarize(rows)
    assert s["num"] == 4 and s["num_errors"] == 1
    assert s["f1"] == pytest.approx(2.5 / 4)                 # the failed query counts as 0
    assert s["total_s"]["mean"] == pytest.approx(7 / 3, abs=1e-4)   # times over answered queries only
    assert s["total_s"]["p50"] == 2.0 and s["numeric"] is None
    assert s["throughput_qps"] == pytest.approx(3 / 7, abs=1e-3)   # 3 answered from t=0 to t=3+4
    assert s["plans"] == {"stuff:2": 3} and s["reasons"] == {"fit": 3}


def test_pareto_frontier():
    pts = [("a", 1.0, 0.5), ("b", 2.0, 0.7), ("c", 3.0, 0.6), ("d", 2.0, 0.7), ("e", 0.5, 0.1)]
    assert pareto_frontier(pts) == ["e", "a", "b", "d"]     # c is dominated by b; b and d tie
    assert pareto_frontier([("x", float("nan"), 1.0), ("y", 1.0, None)]) == []


def test_headline_compares_metis_with_the_baselines():
    sums = {"fixed:stuff:2": summarize(make_rows("fixed:stuff:2", [0.5] * 4, [1.0] * 4)),
            "fixed:stuff:6": summarize(make_rows("fixed:stuff:6", [0.7] * 4, [4.0] * 4)),
            "adaptive": summarize(make_rows("adaptive", [0.72] * 4, [5.0] * 4)),
            "metis": summarize(make_rows("metis", [0.7] * 4, [1.25] * 4))}
    h = headline(sums)
    assert h["best_fixed"]["system"] == "fixed:stuff:6"
    m = h["metis"]
    assert m["fixed_at_similar_latency"]["system"] == "fixed:stuff:2"
    assert m["fixed_at_similar_latency"]["quality_gain"] == pytest.approx(0.2)
    assert m["fixed_at_similar_latency"]["quality_gain_rel"] == pytest.approx(0.4)   # 0.7 / 0.5 - 1
    assert m["fixed_at_equal_quality"]["system"] == "fixed:stuff:6"   # the only plan within 0.01 of 0.7
    assert m["fixed_at_equal_quality"]["latency_ratio"] == pytest.approx(1.25 / 4.0, abs=1e-3)
    sums["metis"] = summarize(make_rows("metis", [0.9] * 4, [1.25] * 4))
    assert headline(sums)["metis"]["fixed_at_equal_quality"] is None     # no fixed plan gets to 0.9
    assert m["vs_adaptive"]["latency_speedup"] == pytest.approx(4.0)
    assert m["vs_adaptive"]["quality_gain"] == pytest.approx(-0.02)
    assert m["vs_best_fixed"]["latency_speedup"] == pytest.approx(3.2)


def test_write_eval_report_files(tmp_path):
    runs = [Run(System("fixed:stuff:2", "fixed"), make_rows("fixed:stuff:2", [0.4, 0.6], [1.0, 1.2])),
            Run(System("fixed:map_reduce:6:64", "fixed"),
                make_rows("fixed:map_reduce:6:64", [0.8, 0.7], [6.0, 7.0], "map_reduce:6:64")),
            Run(System("adaptive", "adaptive"), make_rows("adaptive", [0.8, 0.8], [5.0, 8.0], "map_reduce:6:64")),
            Run(System("metis", "metis"), make_rows("metis", [0.75, 0.7], [2.0, 2.5], "stuff:6"),
                extra={"scheduler": {"plans": {"fit": 2}}})]
    meta = {"dataset": "qmsum", "model": "smollm2", "engine": "local", "num": 2, "rate_qps": 0.5, "seed": 0,
            "quality_metric": "rouge_l", "command": "ragserve eval --dataset qmsum --num 2", "corpus": {"chunks": 10}}
    report = write_eval_report(tmp_path, meta, runs, {"metis+blend": "unavailable: test"})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["meta"]["command"] == meta["command"] and "git_commit" in saved["meta"]
    assert "numpy" in saved["meta"]["versions"] and saved["systems"]["metis"]["scheduler"] == {"plans": {"fit": 2}}
    assert saved["pareto_frontier"] == report["pareto_frontier"]
    assert "metis" in saved["pareto_frontier"] and "fixed:map_reduce:6:64" not in saved["pareto_frontier"]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 8
    md = (tmp_path / "report.md").read_text()
    assert "| `metis` |" in md and "ragserve eval --dataset qmsum" in md and "unavailable: test" in md
    for png in ("quality_vs_latency.png", "f1_vs_latency.png"):      # rouge_l primary -> F1 plot too
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_evals_tables_the_headlines(tmp_path):
    from eval.summarize_evals import main

    runs = [Run(System("fixed:stuff:2", "fixed"), make_rows("fixed:stuff:2", [0.5, 0.5], [1.0, 1.0])),
            Run(System("fixed:stuff:6", "fixed"), make_rows("fixed:stuff:6", [0.7, 0.7], [4.0, 4.0])),
            Run(System("metis", "metis"), make_rows("metis", [0.7, 0.7], [1.2, 1.2]))]
    meta = {"dataset": "squad", "model": "qwen", "engine": "local", "num": 2, "rate_qps": 0.5, "seed": 0,
            "quality_metric": "f1", "command": "ragserve eval --dataset squad", "corpus": {"chunks": 10}}
    write_eval_report(tmp_path / "run", meta, runs, {})
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "sum")]) == 0
    row = json.loads((tmp_path / "sum.json").read_text())[0]
    assert row["fixed_at_equal_quality"]["system"] == "fixed:stuff:6"
    assert row["fixed_at_equal_quality"]["latency_ratio"] == pytest.approx(0.3)
    assert "0.30 (`fixed:stuff:6`)" in (tmp_path / "sum.md").read_text()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_blend_systems_are_compared_with_their_unblended_selves():
    tuned = make_rows("tuned", [0.5, 0.5, 1.0, 0.0], [4.0, 4.0, 4.0, 4.0])
    blended = make_rows("tuned+blend", [0.5, 0.3, 1.0, 0.2], [2.0, 2.0, 2.0, 2.0])
    d = paired_diff(blended, tuned)
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.0) and d["ci95"] == pytest.approx(1.96 * (0.08 / 3) ** 0.5 / 2, abs=1e-4)
    counters = {"blended_calls": 4, "blended_tokens": 400, "reused_tokens": 300, "prefill_token_equiv": 100.0}
    report = build_report({}, {"tuned": tuned, "tuned+blend": blended, "fixed:stuff:1": make_rows("fixed:stuff:1", [0.4], [1.0])},
                          extra={"tuned+blend": {"blend": counters}})
    c = report["blend_vs_unblended"]["tuned+blend"]
    assert c["vs"] == "tuned" and c["latency_ratio"] == 0.5 and c["blended_calls"] == 4
    assert c["reused_share"] == 0.75 and c["prefill_work_share"] == 0.25   # 400 prompt tokens, all blended
    assert "tuned+blend" in report["headline"] and "blend_vs_unblended" not in build_report({}, {"tuned": tuned})
    assert "| `tuned+blend` | `tuned` | 4 | 0.000 ± " in render_markdown(report)


def test_the_run_start_commit_wins_over_the_one_at_write_time():
    report = build_report({"git_commit": "abc123", "git_dirty": False}, {"tuned": make_rows("tuned", [0.4], [1.0])})
    assert report["meta"]["git_commit"] == "abc123" and report["meta"]["git_dirty"] is False
    assert "versions" in report["meta"]            # the rest of the environment still comes along
