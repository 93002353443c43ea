"""Live-load tab: the engine's KV use and queues over time, sampled in the background while
queries run (from the other tabs, other clients, or the load generator here)."""
from __future__ import annotations

import time

import streamlit as st

from ui.backend import QueryBackend
from ui.load import LoadMonitor
from ui.registry import load_run_for, monitor_for, start_load_run
from ui.charts import load_figure
from ui.views.common import collection_picker, plan_picker, usable

WINDOW_S = 300
DEFAULT_QUESTIONS = ("When did the 1973 oil crisis begin?\nWho proclaimed the oil embargo?\n"
                     "What was the price of oil in 1974?\nWhich countries were targeted by the embargo?")


def _chart(monitor: LoadMonitor) -> None:
    now = time.time()
    samples = [s for s in monitor.samples() if now - s.t <= WINDOW_S]
    if monitor.last_error:
        st.error(f"Cannot sample the engine load: {monitor.last_error}", icon=":material/cloud_off:")
    if not samples:
        st.info("No load samples yet.")
        return
    last = samples[-1]
    used = last.kv_used_tokens / last.kv_capacity_tokens if last.kv_capacity_tokens else 0.0
    peak = max(s.kv_used_tokens for s in samples)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("KV in use", f"{used:.1%}", help=f"{last.kv_used_tokens:,} of {last.kv_capacity_tokens:,} tokens")
    c2.metric("Peak KV (window)", f"{peak:,} tokens")
    c3.metric("Engine calls running / waiting", f"{last.num_running} / {last.num_waiting}")
    c4.metric("Queries waiting for KV", last.sched_waiting)
    st.plotly_chart(load_figure(samples), key="live_chart")
    st.caption(f"{len(samples)} samples every {monitor.interval_s:g} s over the last {WINDOW_S // 60} minutes")


def _load_generator(backend: QueryBackend) -> None:
    with st.expander("Generate load", expanded=True):
        collection = collection_picker(backend, key="live_collection")
        questions = st.text_area("Questions (one per line)", DEFAULT_QUESTIONS, key="live_questions")
        c1, c2 = st.columns(2)
        with c1:
            plan = plan_picker("Plan", key="live_plan", index=1)
        with c2:
            concurrency = st.number_input("Concurrent queries", 1, 32, 4, key="live_concurrency")
            rounds = st.number_input("Rounds over the questions", 1, 20, 1, key="live_rounds")
        if st.button("Run load", key="live_run", disabled=collection is None):
            lines = [q.strip() for q in questions.splitlines() if q.strip()]
            if lines:
                start_load_run(backend, lines, collection or "", plan, int(concurrency), int(rounds))
            else:
                st.warning("Type at least one question.")
        run = load_run_for(backend)
        if run is not None:
            state = "finished" if run.finished else "running"
            st.caption(f"load run {state}: {run.done} of {run.total} queries done, {len(run.errors)} failed")
            for error in run.errors[-3:]:
                st.error(error, icon=":material/cloud_off:")


def render(backend: QueryBackend | None, problem: str | None = None) -> None:
    st.subheader("Live load")
    if not usable(backend, problem):
        return
    assert backend is not None
    monitor = monitor_for(backend)
    monitor.start()
    monitor.sample()   # at least one fresh point per rerun
    _load_generator(backend)
    auto = st.toggle("Auto-refresh every second", key="live_auto")
    if not auto:
        st.button("Refresh", key="live_refresh")
    # A fragment reruns alone: the chart refreshes without rerunning the other tabs.
    st.fragment(_chart, run_every=1.0 if auto else None)(monitor)
