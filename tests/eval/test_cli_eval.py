"""`ragserve eval` / `ragserve tune`: bad input fails fast (exit 2, no model loaded)."""
from __future__ import annotations

import pytest

from ragserve.cli import main


@pytest.mark.parametrize("argv, message", [
    (["eval", "--dataset", "squad", "--out", "x", "--rate", "0"], "rate"),
    (["eval", "--dataset", "squad", "--out", "x", "--systems", "magic"], "unknown system"),
    (["eval", "--dataset", "squad", "--out", "x", "--grid", "stuff"], "METHOD:NUM_CHUNKS"),
    (["eval", "--dataset", "squad"], "--out is required"),
    (["tune"], "needs --dataset"),
    (["tune", "train-profiler"], "profile dir"),
    (["tune", "train-profiler", "/nonexistent/profile"], "no tuning profile"),
    (["tune", "sweep", "extra-dir", "--dataset", "squad"], "unexpected arguments"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_dataset(capsys, tmp_path):
    assert main(["eval", "--dataset", "musique", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'musique'" in capsys.readouterr().err
