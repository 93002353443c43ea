"""controller_sweep's real points: paired CIs against the same dataset's best fixed plan."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "controller_sweep.py"


def _script():
    spec = importlib.util.spec_from_file_location("controller_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(d: Path, dataset: str, qualities: dict[str, list[float]]) -> str:
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"meta": {"dataset": dataset, "rate_qps": 0.5}}))
    rows = [{"id": f"{dataset}-{i}", "system": system, "quality": q, "total_s": 1.0 + i, "arrival_s": float(i)}
            for system, qs in qualities.items() for i, q in enumerate(qs)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"1.5={d}"


def test_real_points_pair_within_their_dataset(tmp_path):
    cs = _script()
    specs = [_run(tmp_path / "a", "squad", {"fixed:stuff:3": [0.0, 1.0, 0.5], "tuned": [1.0, 1.0, 0.5]}),
             _run(tmp_path / "b", "2wikimultihopqa", {"fixed:stuff:1": [0.0, 0.0], "tuned": [0.5, 0.5]})]
    info = {"squad": {"engines": {"cpu": {"slo_s": 10.0, "best_fixed": "stuff:3"}}},
            "2wikimultihopqa": {"engines": {"cpu": {"slo_s": 10.0, "best_fixed": "stuff:1"}}}}
    points = {(p["dataset"], p["system"]): p for p in cs.real_points(specs, info)}
    assert points["squad", "tuned"]["quality_diff_vs_best_fixed"] == pytest.approx(1 / 3)
    assert points["2wikimultihopqa", "tuned"]["quality_diff_vs_best_fixed"] == pytest.approx(0.5)
    assert points["squad", "fixed:stuff:3"]["quality_ci95"] == pytest.approx(0.0)
