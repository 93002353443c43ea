"""What the explorer opens on: the largest, newest result set and collection, with chart
labels that do not overlap."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.ui.conftest import EVAL_RUN, REPO, SWEEP
from ui.backend import largest_first
from ui.charts import _CHAR_W, _LABEL_H, label_positions
from ui.data import default_set, discover, set_size_and_date


def test_opens_on_the_largest_result_set_not_a_smoke_run():
    found = discover(REPO)
    first = default_set(found)
    assert first not in (EVAL_RUN, SWEEP)          # the 5-query SmolLM2 runs
    assert set_size_and_date(first)[0] == max(set_size_and_date(p)[0] for p in found) >= 40


def test_ties_go_to_the_newest_run_by_its_own_date_not_file_times(tmp_path: Path):
    def sweep(name: str, created: str, n: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"query_ids": [str(i) for i in range(n)], "created": created}))
        (path / "records.jsonl").write_text("")
        return path

    old = sweep("old", "2026-01-01T00:00:00+0000", 40)
    new = sweep("new", "2026-06-01T00:00:00+0000", 40)
    small = sweep("small", "2026-12-01T00:00:00+0000", 5)
    os.utime(old / "meta.json", (2e9, 2e9))          # a fresh checkout: file times say nothing
    assert default_set([old, new, small]) == new
    assert default_set([]) is None


def test_collections_largest_first():
    assert largest_first([("a-scratch", 1), ("squad", 2067), ("notes", 12), ("b", 12)]) == ["squad", "b", "notes",
                                                                                              "a-scratch"]


def test_collection_sizes_read_the_manifests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path / "data"))
    from ragserve.retrieval.store import collection_sizes
    from tests.server.inprocess import add_collection

    add_collection("tiny", n=1)
    add_collection("big", n=6)
    assert collection_sizes() == {"big": 6, "tiny": 1}


def _box(pos: str, x: float, y: float, text: str) -> tuple[float, float, float, float]:
    w = len(text) * _CHAR_W
    return {"top center": (x - w / 2, y, x + w / 2, y + _LABEL_H),
            "bottom center": (x - w / 2, y - _LABEL_H, x + w / 2, y),
            "middle right": (x, y - _LABEL_H / 2, x + w, y + _LABEL_H / 2),
            "middle left": (x - w, y - _LABEL_H / 2, x, y + _LABEL_H / 2)}[pos]


def test_close_points_get_labels_on_different_sides():
    # The oracle sat just above stuff:1 at nearly the same latency: both labels "top center" overlapped.
    points = [("oracle", 1.00, 0.62, "per-query best"), ("stuff:1", 1.02, 0.60, "stuff:1"),
              ("stuff:6", 6.0, 0.30, "stuff:6"), ("map_rerank:3", 3.0, 0.10, "map_rerank:3")]
    where = label_positions(points)
    assert where["stuff:6"] == "top center" and where["map_rerank:3"] == "top center"   # alone: the default
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    norm = {k: ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for k, x, y, _ in points}
    a = _box(where["oracle"], *norm["oracle"], "per-query best")
    b = _box(where["stuff:1"], *norm["stuff:1"], "stuff:1")
    assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
