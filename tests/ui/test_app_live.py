"""The Live-load tab under AppTest: a burst of real queries on the in-process SmolLM2 engine
shows up in the sampled KV use and queues."""
from __future__ import annotations

import json
import time

import pytest

from tests.ui.conftest import QUERY_TIMEOUT_S
from ui.registry import load_run_for, monitor_for

pytestmark = pytest.mark.model


def test_load_run_shows_kv_use_and_queues_over_time(app, inprocess, small_squad):
    at = app()
    at.radio(key="mode").set_value("in-process controller").run()
    assert not at.exception and not at.tabs[3].error
    at.selectbox(key="live_collection").set_value(small_squad)
    at.selectbox(key="live_plan").set_value("stuff:2")
    at.number_input(key="live_concurrency").set_value(4)
    at.button(key="live_run").click().run()
    run = load_run_for(inprocess)
    assert run is not None and run.total == 4
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.finished and not run.errors
    samples = monitor_for(inprocess).samples()
    assert any(s.kv_used_tokens > 0 for s in samples) and any(s.num_running >= 1 for s in samples)
    assert all(s.kv_capacity_tokens == inprocess.load().kv_capacity_tokens for s in samples)
    at.button(key="live_refresh").click().run()
    assert not at.exception
    assert any("load run finished: 4 of 4 queries done, 0 failed" in c.value for c in at.tabs[3].caption)
    chart = json.loads(at.tabs[3].get("plotly_chart")[0].proto.spec)
    kv = next(t for t in chart["data"] if t["name"] == "KV used")
    assert max(kv["y"]) > 0
    labels = [m.label for m in at.tabs[3].metric]
    assert "KV in use" in labels and "Queries waiting for KV" in labels
    at.toggle(key="live_auto").set_value(True).run()
    assert not at.exception and at.tabs[3].get("plotly_chart")
