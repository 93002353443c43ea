"""`ragserve demo`: METIS chooses each plan and the demo says which and why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragserve import demo
from ragserve.config import Config
from tests.conftest import squad_rows

DECISION = {"profile": {"complexity": "low", "joint_reasoning": False, "pieces": 1, "summary_range": [30, 60],
                        "confidence": 0.91, "source": "llm"},
            "pruned": [{"method": "map_rerank", "num_chunks": 3, "intermediate_tokens": 0},
                       {"method": "stuff", "num_chunks": 2, "intermediate_tokens": 0}],
            "fallback": "map_rerank", "reason": "fit", "kv_free_tokens": 12000}


def test_explain_names_the_profile_the_space_and_the_reason():
    lines = demo.explain(DECISION)
    assert lines[0].startswith("profile: low complexity, no joint reasoning, 1 piece(s)")
    assert lines[1] == "pruned plan space: map_rerank:3, stuff:2 (2 plans)"
    assert lines[2] == "chosen: the most expensive pruned plan that fits the free KV memory (12000 KV tokens free)"
    assert demo.explain({}) == ["plan given, not chosen"]


def test_quality_model_unless_memory_is_short(monkeypatch):
    monkeypatch.setattr(demo, "available_gib", lambda: 20.0)
    assert demo.demo_model(None)[0] == "qwen"
    monkeypatch.setattr(demo, "available_gib", lambda: 1.5)
    model, why = demo.demo_model(None)
    assert model == "smollm2" and "1.5 GiB" in why
    assert demo.demo_model("smollm2") == ("smollm2", "as asked")


@pytest.mark.model
def test_demo_lets_metis_choose(tmp_path: Path, monkeypatch, capsys):
    """The whole demo on a small squad copy with SmolLM2: every answer comes with its chosen plan."""
    rows = squad_rows("corpus", 12)
    ids = {r["id"] for r in rows}
    questions = [q for q in (json.loads(line) for line in open(Path(demo.datasets_dir()) / "squad/questions.jsonl"))
                 if set(q["corpus_ids"]) <= ids][:1]
    assert questions
    (tmp_path / "ds/squad").mkdir(parents=True)
    (tmp_path / "ds/squad/corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ds/squad/questions.jsonl").write_text(json.dumps(questions[0]) + "\n")
    monkeypatch.setenv("RAGSERVE_DATASETS", str(tmp_path / "ds"))
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    assert demo.run_demo(Config(), "demo-test", 1, model="smollm2") == 0
    out = capsys.readouterr().out
    assert "model: smollm2 (as asked)" in out
    assert f"Q: {questions[0]['question']}" in out
    assert "   profile: " in out and "   pruned plan space: " in out and "   chosen: " in out
    assert "copied from the context" not in out
