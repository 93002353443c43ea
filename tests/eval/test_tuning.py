"""Tuning records: the directory format round trip and METIS' best-plan rule."""
from __future__ import annotations

import json

import pytest

from ragserve.errors import BadInput, NotFound
from ragserve.eval.tuning import (FORMAT_VERSION, TuneMeta, TuneRecord, append_record, best_plan, best_plans,
                                  read_meta, read_profile, read_records, summarize_profile, write_labels,
                                  write_meta, write_summary)
from tests.eval.factories import make_record, plan


def make_meta(**overrides) -> TuneMeta:
    values = {"model": "smollm2", "dataset": "squad", "grid": (plan("stuff:2"), plan("map_reduce:6:96")),
              "quality_metric": "f1", "query_ids": ("q1", "q2"), "collection": "eval-squad-smollm2"}
    return TuneMeta(**{**values, **overrides})


def test_record_and_meta_round_trip(tmp_path):
    meta = make_meta()
    write_meta(tmp_path, meta)
    records = [make_record("q1", "stuff:2", 0.5, 1.25, numeric=None, ttft_s=0.3, answer="Paris"),
               make_record("q1", "map_reduce:6:96", 1.0, 9.0, numeric=1.0),
               make_record("q2", "stuff:2", 0.0, None, error="BadInput: no chunk")]
    for r in records:
        append_record(tmp_path, r)
    meta2, records2 = read_profile(tmp_path)
    assert meta2 == meta and records2 == records
    raw = json.loads((tmp_path / "meta.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 1
    assert raw["grid_str"] == ["stuff:2", "map_reduce:6:96"] and raw["best_plan_rule"]["tolerance"] == 0.02
    line = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[1])
    assert line["plan"] == {"method": "map_reduce", "num_chunks": 6, "intermediate_tokens": 96}
    assert line["plan_str"] == "map_reduce:6:96" and line["latency_s"] == 9.0
    assert TuneRecord.from_dict(line) == records[1]


def test_truncated_last_line_is_ignored_but_corruption_elsewhere_is_an_error(tmp_path):
    write_meta(tmp_path, make_meta())
    append_record(tmp_path, make_record("q1"))
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"query_id": "q2", "quest')          # a run killed mid-write
    assert [r.query_id for r in read_records(tmp_path)] == ["q1"]
    (tmp_path / "records.jsonl").write_text('{"bad": 1}\n' + json.dumps(make_record("q1").to_dict()) + "\n")
    with pytest.raises(BadInput):
        read_records(tmp_path)


def test_unknown_format_version_and_missing_dir(tmp_path):
    with pytest.raises(NotFound):
        read_meta(tmp_path)
    raw = make_meta().to_dict()
    raw["format_version"] = 2
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(BadInput, match="format_version"):
        read_meta(tmp_path)


def test_best_plan_is_the_cheapest_within_two_percent():
    recs = [make_record("q", "map_reduce:6:96", 0.90, 9.0),
            make_record("q", "stuff:6", 0.885, 3.0),      # 0.885 >= 0.98 * 0.90 = 0.882: in the band
            make_record("q", "stuff:2", 0.88, 1.0),       # 0.88 < 0.882: out
            make_record("q", "map_rerank:3", 0.2, 0.5)]
    best = best_plan(recs)
    assert str(best.plan) == "stuff:6" and best.max_quality == 0.90 and best.num_candidates == 2
    assert str(best_plan(recs, tolerance=0.05).plan) == "stuff:2"   # a wider band admits it
    assert str(best_plan(recs, tolerance=0.0).plan) == "map_reduce:6:96"


def test_best_plan_ties_and_failures():
    # equal quality and latency: fewer prompt tokens wins, then plan order
    tied = [make_record("q", "stuff:6", 1.0, 2.0, prompt_tokens=900),
            make_record("q", "stuff:3", 1.0, 2.0, prompt_tokens=400),
            make_record("q", "map_rerank:3", 1.0, 2.0, prompt_tokens=400)]
    assert str(best_plan(tied).plan) == "map_rerank:3"   # equal tokens: RagPlan order (method name first)
    assert str(best_plan(tied[:2]).plan) == "stuff:3"    # fewer prompt tokens
    # all plans scored 0: every plan is within the band, the fastest wins
    zeros = [make_record("q", "stuff:6", 0.0, 2.0), make_record("q", "map_rerank:1", 0.0, 0.4)]
    assert str(best_plan(zeros).plan) == "map_rerank:1"
    # failed records never win; a query whose plans all failed has no best plan
    failed = [make_record("q", "stuff:1", 0.0, None, error="x"), make_record("q", "stuff:6", 0.0, 3.0)]
    assert str(best_plan(failed).plan) == "stuff:6"
    assert best_plan([make_record("q", error="x", latency_s=None, quality=0.0)]) is None
    with pytest.raises(BadInput):
        best_plan([make_record("a"), make_record("b")])


def test_best_plans_groups_by_query_and_labels_file(tmp_path):
    recs = [make_record("q1", "stuff:2", 1.0, 1.0), make_record("q1", "stuff:6", 1.0, 2.0),
            make_record("q2", "stuff:2", 0.1, 1.0), make_record("q2", "map_reduce:6:96", 0.8, 8.0)]
    best = best_plans(recs)
    assert {q: str(b.plan) for q, b in best.items()} == {"q1": "stuff:2", "q2": "map_reduce:6:96"}
    write_labels(tmp_path, recs)
    labels = [json.loads(l) for l in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [l["best_plan_str"] for l in labels] == ["stuff:2", "map_reduce:6:96"]


def test_summary_has_the_per_query_best(tmp_path):
    meta = make_meta(grid=(plan("stuff:2"), plan("map_reduce:6:96")))
    recs = [make_record("q1", "stuff:2", 1.0, 1.0), make_record("q1", "map_reduce:6:96", 1.0, 8.0),
            make_record("q2", "stuff:2", 0.0, 1.0), make_record("q2", "map_reduce:6:96", 0.8, 8.0)]
    s = summarize_profile(meta, recs)
    oracle = s["plans"]["per-query best"]
    assert oracle["quality"] == pytest.approx(0.9) and oracle["total_s"]["mean"] == pytest.approx(4.5)
    assert s["best_plan_counts"] == {"stuff:2": 1, "map_reduce:6:96": 1}
    write_summary(tmp_path, meta, recs)
    assert (tmp_path / "plans.png").stat().st_size > 1000 and "per-query best" in (tmp_path / "summary.md").read_text()
