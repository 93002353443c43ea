"""`ragserve tune --ray local`: a private Ray cluster on 127.0.0.1 with two SmolLM2 workers
gives the same records as the in-process sweep (greedy decoding), and resumes like it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ragserve.cli import main

pytest.importorskip("ray", reason="tuning on Ray needs the scale extra: pip install -e '.[scale]'")

pytestmark = [pytest.mark.model, pytest.mark.scale]

TUNE = ["tune", "--dataset", "squad", "--num", "2", "--model", "smollm2", "--corpus-limit", "8",
        "--grid", "map_rerank:1,stuff:2", "--no-progress"]
TIMING = {"latency_s", "ttft_s"}


@pytest.fixture()
def data_dir(session_data_dir, monkeypatch):
    monkeypatch.setenv("RAGSERVE_DATA", str(session_data_dir))
    monkeypatch.setenv("RAGSERVE_THREADS", "1")     # each worker's engine: one core
    return session_data_dir


def records(out: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {(r["query_id"], r["plan_str"]): {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def test_ray_sweep_equals_the_local_sweep_and_resumes(data_dir, tmp_path):
    import ray

    local, on_ray = tmp_path / "local", tmp_path / "ray"
    config = tmp_path / "short.yaml"
    config.write_text("synthesis: {answer_tokens: 8}\n")    # short answers: the test is about the records
    tune = ["--config", str(config)] + TUNE
    assert main(tune + ["--out", str(local)]) == 0
    # Resume: a profile holding one finished cell; the Ray run adds only the other three.
    first = (local / "records.jsonl").read_text().splitlines()[0]
    on_ray.mkdir()
    (on_ray / "records.jsonl").write_text(first + "\n")
    (on_ray / "meta.json").write_text((local / "meta.json").read_text())
    assert main(tune + ["--out", str(on_ray), "--ray", "local", "--ray-workers", "2"]) == 0
    assert not ray.is_initialized()                          # the private cluster is shut down
    assert len((on_ray / "records.jsonl").read_text().splitlines()) == 4
    got, want = records(on_ray), records(local)
    assert got.keys() == want.keys() and len(want) == 4
    for key in want:
        assert got[key] == want[key], key
    assert all(r["error"] is None for r in want.values())
    meta = json.loads((on_ray / "meta.json").read_text())
    assert meta["complete"] and "--ray" in meta["command"]
    assert (on_ray / "labels.jsonl").read_text() != ""


def test_local_cluster_listens_on_loopback_only():
    import ray

    from ragserve.eval.ray_sweep import connect

    started, temp_dir = connect("local", 1)
    try:
        assert started and ray._private.worker._global_node.node_ip_address == "127.0.0.1"
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not ray.is_initialized()
