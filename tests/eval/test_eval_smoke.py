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


def test_tune_train_quality_and_the_tuned_system_end_to_end(data_dir, tmp_path):
    """Sweep (cells concurrent) -> quality model -> `eval --systems tuned` on the sweep's own
    questions (cross-fitted) -> the controller sweep with the run as a real point."""
    import subprocess
    import sys
    from pathlib import Path

    prof = tmp_path / "profiles"
    assert main(["tune", "--dataset", "squad", "--num", "4", "--model", "smollm2", "--corpus-limit", "20",
                 "--grid", "stuff:1,stuff:2", "--concurrency", "2", "--out", str(prof), "--no-progress"]) == 0
    meta = json.loads((prof / "meta.json").read_text())
    assert meta["machine_load"]["sweep"]["concurrency"] == 2
    assert meta["machine_load"]["sweep"]["engine_speeds"]["num_prefills"] > 0
    assert main(["tune", "train-quality", str(prof), "--no-progress"]) == 0
    assert json.loads((prof / "quality" / "quality_model.json").read_text())["num_queries"] == 4
    out = tmp_path / "tuned-eval"
    assert main(["eval", "--dataset", "squad", "--systems", "fixed:stuff:1,tuned", "--num", "4", "--model",
                 "smollm2", "--corpus-limit", "20", "--rate", "0.5", "--quality", str(prof),
                 "--questions-from", str(prof), "--warmup", "0", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["system"] == "tuned"]
    assert len(tuned) == 4 and all(r["reason"] in ("quality", "load", "slo") for r in tuned)
    assert all(r["est_service_s"] and r["service_s"] for r in tuned)
    report = json.loads((out / "report.json").read_text())
    assert report["systems"]["tuned"]["engine_speeds"]["num_prefills"] > 0
    assert "service_estimate" in report["systems"]["tuned"]
    sweep = tmp_path / "cs"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(repo / "eval" / "controller_sweep.py"), "--profiles", str(prof),
                    "--out", str(sweep), "--reps", "1", "--folds", "2", "--rate-factors", "0.5",
                    "--real", f"0.5={out}"], check=True, cwd=tmp_path, timeout=600)
    doc = json.loads((tmp_path / "cs.json").read_text())
    assert {p["source"] for p in doc["points"]} == {"sim", "real", "replay"}
    replay = [v for v in doc["validation"] if v["replay_mean_s"] is not None]
    assert replay and all(v["replay_mean_s"] > 0 for v in replay)   # the real run's own trace, simulated
    assert {"dataset", "rate_factor", "source", "system", "n", "quality", "quality_ci95", "mean_s", "p95_s",
            "slo_attainment", "goodput_qps"} <= set(doc["points"][0])


def test_eval_blend_system_is_timed_on_precomputed_chunk_kv(data_dir, tmp_path):
    """metis+blend: the chunks its questions retrieve get their KV stored before the run
    (untimed, as `ingest --precompute-kv` would), so no call prefills a chunk itself."""
    out = tmp_path / "blend-eval"
    assert main(["eval", "--dataset", "squad", "--systems", "metis+blend", "--num", "2", "--model", "smollm2",
                 "--corpus-limit", "20", "--rate", "inf", "--warmup", "0", "--out", str(out),
                 "--no-progress"]) == 0
    s = json.loads((out / "report.json").read_text())["systems"]["metis+blend"]
    assert s["num"] == 2 and s["num_errors"] == 0
    pre = s["blend_precompute"]
    assert pre["k"] >= 1 and 1 <= pre["chunks"] <= 2 * pre["k"] and pre["computed"] + pre["found"] >= pre["chunks"]
    assert s["blend"]["segments_computed"] == 0
