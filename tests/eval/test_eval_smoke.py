"""End to end on SmolLM2: `ragserve eval` (fixed + metis) over 3 squad questions on a corpus
subset, then `ragserve tune` on 2 questions -> train-profiler -> metis with the learned profiler."""
from __future__ import annotations

import json
import os

import pytest

from ragserve.cli import main

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture()
def data_dir(session_data_dir, monkeypatch):
    monkeypatch.setenv("RAGSERVE_DATA", str(session_data_dir))
    return session_data_dir


def test_eval_smoke_fixed_and_metis(data_dir, tmp_path):
    out = tmp_path / "smoke"
    code = main(["eval", "--dataset", "squad", "--systems", "fixed:stuff:2,metis", "--num", "3", "--model",
                 "smollm2", "--corpus-limit", "20", "--rate", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == {"fixed:stuff:2", "metis"}
    for name, s in report["systems"].items():
        assert s["num"] == 3 and s["num_errors"] == 0, name
        assert s["total_s"]["mean"] > 0 and 0.0 <= s["f1"] <= 1.0
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    metis = [r for r in rows if r["system"] == "metis"]
    assert all(r["reason"] in ("fit", "slo", "fallback") and r["profile"] for r in metis)
    assert report["meta"]["corpus"]["subset"] and report["meta"]["command"].startswith("ragserve eval")
    assert (out / "quality_vs_latency.png").is_file()
    # the same command again: both systems are read back from out/systems, not run again
    assert main(["eval", "--dataset", "squad", "--systems", "fixed:stuff:2,metis", "--num", "3", "--model",
                 "smollm2", "--corpus-limit", "20", "--rate", "1", "--out", str(out), "--no-progress"]) == 0
    again = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    assert again == rows


def test_tune_train_and_learned_metis(data_dir, tmp_path):
    prof = tmp_path / "profiles"
    assert main(["tune", "--dataset", "squad", "--num", "2", "--model", "smollm2", "--corpus-limit", "20",
                 "--grid", "map_rerank:1,stuff:2", "--out", str(prof), "--no-progress"]) == 0
    records = (prof / "records.jsonl").read_text().splitlines()
    assert len(records) == 4 and json.loads((prof / "meta.json").read_text())["complete"]
    assert main(["tune", "train-profiler", str(prof)]) == 0
    out = tmp_path / "learned-eval"
    assert main(["eval", "--dataset", "squad", "--systems", "metis", "--num", "2", "--model", "smollm2",
                 "--corpus-limit", "20", "--rate", "inf", "--learned", str(prof / "learned"),
                 "--warmup", "0", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    assert all(r["profile"]["source"] == "learned" for r in rows)
