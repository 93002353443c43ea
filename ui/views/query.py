"""Try-a-query tab: the profile, pruned plans, chosen plan and why, stage timings, the answer
as it streams, and the chunks used with their scores."""
from __future__ import annotations

import streamlit as st

from ui.backend import QueryBackend
from ui.outcome import QueryOutcome
from ui.views.common import (collection_picker, plan_picker, render_chunks, render_decision, render_timings,
                             stream_query, usable)

LAST = "query_last"   # session key: the last outcome, redrawn on reruns


def _summary(result: QueryOutcome) -> None:
    t = result.timings
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Total", f"{t.get('total_s', 0):.2f} s")
    c2.metric("TTFT", f"{t.get('ttft_s', 0):.2f} s")
    c3.metric("Tokens (prompt + output)", f"{result.prompt_tokens} + {result.output_tokens}")
    c4.metric("LLM calls", result.num_calls)
    st.markdown("**Where the time went**")
    render_timings([result], key="query_stages")
    render_chunks(result.info, key="query_chunks")


def render(backend: QueryBackend | None, problem: str | None = None) -> None:
    st.subheader("Try a query")
    if not usable(backend, problem):
        return
    assert backend is not None
    collection = collection_picker(backend, key="query_collection")
    question = st.text_area("Question", key="query_question", height=80,
                            placeholder="When did the 1973 oil crisis begin?")
    c1, c2 = st.columns(2)
    with c1:
        plan = plan_picker("Plan", key="query_plan")
    with c2:
        slo_ms = st.number_input("Latency SLO (ms, 0 = none)", min_value=0, max_value=600_000, value=0,
                                 step=1000, key="query_slo_ms")
    ask = st.button("Ask", type="primary", key="query_ask", disabled=collection is None)
    if ask:
        if not question.strip():
            st.warning("Type a question first.")
            return
        result = stream_query(backend, question.strip(), collection or "", plan, float(slo_ms) or None)
        st.session_state[LAST] = result
        if result is not None:
            _summary(result)
    elif (result := st.session_state.get(LAST)) is not None:
        render_decision(result.info)
        st.markdown("**Answer**")
        st.container(key="query_answer").markdown(result.answer or "_(empty answer)_")
        _summary(result)
