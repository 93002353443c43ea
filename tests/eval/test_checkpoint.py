"""Resumable evaluations: saved system runs are reused only under the same key, never half-read."""
from __future__ import annotations

from ragserve.eval import checkpoint


def test_system_round_trip_and_key_mismatch(tmp_path):
    key = checkpoint.workload_key({"dataset": "squad", "queries": [("q1", 0.0), ("q2", 1.5)]})
    rows = [{"id": "q1", "f1": 0.5}, {"id": "q2", "f1": 1.0}]
    checkpoint.save_system(tmp_path, key, "fixed:map_reduce:6:64", rows, 12.5, {"scheduler": {"admitted": 2}})
    saved = checkpoint.load_system(tmp_path, key, "fixed:map_reduce:6:64")
    assert saved["rows"] == rows and saved["wall_s"] == 12.5 and saved["extra"] == {"scheduler": {"admitted": 2}}
    other = checkpoint.workload_key({"dataset": "squad", "queries": [("q1", 0.0), ("q2", 1.6)]})
    assert other != key
    assert checkpoint.load_system(tmp_path, other, "fixed:map_reduce:6:64") is None   # other arrivals: rerun
    assert checkpoint.load_system(tmp_path, key, "metis") is None                      # never ran


def test_unreadable_checkpoint_is_ignored(tmp_path):
    key = checkpoint.workload_key({"x": 1})
    checkpoint.save_system(tmp_path, key, "metis", [{"id": "q"}], 1.0, {})
    path = next((tmp_path / checkpoint.DIR).glob("*.json"))
    path.write_text(path.read_text()[:20])            # a truncated file
    assert checkpoint.load_system(tmp_path, key, "metis") is None
    assert not list((tmp_path / checkpoint.DIR).glob("*.tmp"))


def test_calibration_round_trip(tmp_path):
    key = checkpoint.workload_key({"rate": "auto"})
    checkpoint.save_calibration(tmp_path, key, {"rate_qps": 0.05, "calibration_service_s": 20.0})
    assert checkpoint.load_calibration(tmp_path, key) == {"rate_qps": 0.05, "calibration_service_s": 20.0}
    assert checkpoint.load_calibration(tmp_path, checkpoint.workload_key({"rate": 1})) is None


def test_calibrated_rate_is_the_recorded_one():
    """calibration.json records the rate at 4 decimals and a resumed run re-times arrivals with
    it; the first run must use exactly that value, or every saved system's key misses."""
    import asyncio
    from types import SimpleNamespace

    from ragserve.eval.datasets import get_spec
    from ragserve.eval.runner import calibrate_rate

    class Timed:   # answers with a fixed service time: 1.5 / 3.0137 = 0.49773...
        async def query(self, *_a, **_k):
            return SimpleNamespace(timings=SimpleNamespace(total_s=3.0137))

    rate, service_s = asyncio.run(calibrate_rate(Timed(), [{"question": "q"}], "c", get_spec("squad"), False))
    assert rate == round(rate, 4) == 0.4977 and service_s == 3.0137
