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


def test_replay_runs_a_real_trace_through_the_simulated_engine(tmp_path):
    cs = _script()
    d = tmp_path / "run"
    d.mkdir()
    speeds = {"prefill_tok_s": 100.0, "step_base_s": 0.1, "step_per_row_s": 0.0, "output_tokens": {"stuff": 4.0}}
    (d / "report.json").write_text(json.dumps({
        "meta": {"dataset": "squad", "model": "qwen", "rate_qps": 0.1, "engine_config": {"kv_budget_mb": 64.0},
                 "synthesis": {"answer_tokens": 32}},
        "systems": {"fixed:stuff:1": {"engine_speeds": speeds}}}))
    # two queries 100 s apart, each alone on the engine: 200 tokens at 100 tok/s, then 4 steps
    rows = [{"id": f"q{i}", "system": "fixed:stuff:1", "plan": "stuff:1", "quality": 0.5, "prompt_tokens": 200,
             "output_tokens": 4, "num_calls": 1, "arrival_s": 100.0 * i, "total_s": 3.0, "error": None}
            for i in range(2)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = type("Args", (), {"dtype_bytes": ["4"], "kv_budget_mb": 64.0, "answer_tokens": 64})()
    (p,) = cs.replay_points([f"1.5={d}"], args)
    assert p["source"] == "replay" and p["n"] == 2 and p["quality"] == 0.5
    assert p["mean_s"] == pytest.approx(200 / 100 + 4 * 0.1)


def test_a_replayed_row_is_priced_at_its_own_prompt_tokens():
    from ragserve.metis.cost import CostConfig, CostModel
    from tests.metis.factories import QWEN

    cs = _script()
    cost = CostModel(QWEN, CostConfig(overhead_tokens_per_call=cs.REPLAY_OVERHEAD))
    for plan, calls, prompt in (("stuff:3", 1, 400), ("map_rerank:2", 2, 500)):
        q = cs.replay_query({"id": "q", "plan": plan, "num_calls": calls, "prompt_tokens": prompt,
                             "output_tokens": 5, "quality": 1.0}, cs.REPLAY_OVERHEAD)
        (p,) = q.outcomes
        assert abs(cost.estimate(p, q.chunk_tokens, q.question_tokens).prompt_tokens - prompt) <= 3


def test_per_dataset_options_fall_back_to_the_bare_value():
    cs = _script()
    specs = ["runs/squad-1.5x", "financebench=runs/financebench-1.5x"]
    assert cs.for_dataset(specs, "financebench", "--speeds-from") == "runs/financebench-1.5x"
    assert cs.for_dataset(specs, "squad", "--speeds-from") == "runs/squad-1.5x"
    assert cs.for_dataset([], "squad", "--speeds-from") is None
    with pytest.raises(SystemExit, match="at most one value"):
        cs.for_dataset(["a", "b"], "squad", "--speeds-from")
