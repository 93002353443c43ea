"""Quality model features, cross-fitting, and gold-free labels: pure, on factory records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, ConfigError
from ragserve.eval.golden import agreement, golden_plan, read_questions
from ragserve.eval.quality_training import CrossFitModel, cross_fit, selection_report, train_quality, training_data
from ragserve.eval.tuning import TuneMeta, TuneRecord, append_record, write_meta
from ragserve.metis.quality import feature_rows, load_quality_model
from tests.metis.factories import make_cost_model

S1, S3, MR3 = RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 3), RagPlan(Method.MAP_RERANK, 3)


def retrieval(top_gap: float) -> dict:
    scores = [0.5 + top_gap] + [0.5 - 0.01 * i for i in range(9)]
    return {"scores": scores, "doc_ids": [f"d{i % 3}" for i in range(10)], "tokens": [200] * 10}


def write_sweep(d, n: int = 30) -> None:
    """Queries with a clear top hit are answered by stuff:1, flat ones need stuff:3."""
    grid = (S1, S3, MR3)
    write_meta(d, TuneMeta(model="qwen", dataset="squad", grid=grid, quality_metric="f1",
                           query_ids=tuple(f"q{i}" for i in range(n)), collection="c"))
    for i in range(n):
        clear = i % 2 == 0
        ret = retrieval(0.3 if clear else 0.0)
        for plan, q in ((S1, 0.8 if clear else 0.2), (S3, 0.6 if clear else 0.7), (MR3, 0.3)):
            append_record(d, TuneRecord(f"q{i}", f"question number {i}?", plan, q, 1.0 + plan.num_chunks,
                                        prompt_tokens=200 * plan.num_chunks, output_tokens=8, num_calls=1,
                                        answer="x", retrieval=ret))


def test_features_read_retrieval_evidence_per_plan():
    rows = feature_rows("Who wrote it?", retrieval(0.3), [S1, S3])
    assert rows.shape[0] == 2 and rows.shape[1] == rows[1].shape[0]
    assert not np.array_equal(rows[0], rows[1])          # plan features differ


def test_cross_fitted_predictions_pick_the_right_plan_per_query(tmp_path):
    write_sweep(tmp_path)
    data = training_data([tmp_path])
    assert len(data.query_ids) == 30 and len(data.y) == 90
    pred = cross_fit(data, k=3)
    report = selection_report(data, pred)
    # per-query choice beats every fixed plan (0.5 / 0.65 / 0.3) and nears the oracle (0.75)
    assert report["selected"]["0.0"]["quality"] > max(f["quality"] for f in report["fixed"].values())
    assert report["oracle"]["quality"] == pytest.approx(0.75)


def test_train_saves_a_model_the_planner_loads(tmp_path):
    write_sweep(tmp_path / "sweep")
    report = train_quality([tmp_path / "sweep"], tmp_path / "model", k=3)
    assert report["num_queries"] == 30
    model = load_quality_model(tmp_path / "model")
    assert set(model.grid) == {S1, S3, MR3}
    clear = model.predict_summary("q?", retrieval(0.3), [S1, S3])
    flat = model.predict_summary("q?", retrieval(0.0), [S1, S3])
    assert clear[0] > clear[1] and flat[1] > flat[0]
    meta = json.loads((tmp_path / "model" / "quality_model.json").read_text())
    meta["feature_version"] = 0
    (tmp_path / "model" / "quality_model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="retrain"):
        load_quality_model(tmp_path / "model")
    with pytest.raises(ConfigError, match="train-quality"):
        load_quality_model(tmp_path / "nothing")


def test_cross_fit_model_never_plans_a_sweep_query_with_a_model_that_saw_it(tmp_path):
    write_sweep(tmp_path)
    m = CrossFitModel([tmp_path], k=3)
    assert len(m.folds) == 3 and set(m.grid) == {S1, S3, MR3}
    assert m._fold_of_question["question number 0?"] in (0, 1, 2)


def test_read_questions_accepts_lines_and_jsonl_and_names_bad_lines(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("How tall is Mount Kelby?\n\n{\"id\": \"z\", \"question\": \"Who founded it?\"}\n")
    assert read_questions(f) == [{"id": "q1", "question": "How tall is Mount Kelby?"},
                                 {"id": "z", "question": "Who founded it?"}]
    f.write_text("{\"id\": 1, \"text\": \"no question\"}\n")
    with pytest.raises(BadInput, match="line 1"):
        read_questions(f)
    with pytest.raises(BadInput, match="does not exist"):
        read_questions(tmp_path / "missing.txt")


def test_golden_plan_is_the_most_expensive_that_fits():
    cost = make_cost_model()
    grid = (S1, S3, RagPlan(Method.STUFF, 6))
    assert golden_plan(grid, cost, [200] * 10, 10, 8192) == RagPlan(Method.STUFF, 6)
    assert golden_plan(grid, cost, [200] * 10, 10, 800) == S3
    with pytest.raises(BadInput, match="fits"):
        golden_plan(grid, cost, [2000] * 10, 10, 800)
    assert agreement("2,450 meters", "2,450 meters tall") > 0.5
