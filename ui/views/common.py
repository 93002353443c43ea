"""Widgets and renderers the query, compare and live tabs share."""
from __future__ import annotations

from typing import Any

import streamlit as st

from ui.backend import BackendError, QueryBackend
from ui.charts import stage_figure
from ui.outcome import PlanInfo, QueryOutcome, explain, outcome, plan_info, profile_rows, stage_breakdown

AUTO = "auto (METIS chooses)"
PLANS = [AUTO, "stuff:1", "stuff:2", "stuff:4", "map_rerank:3", "map_reduce:4:48", "refine:3:48"]


def usable(backend: QueryBackend | None, problem: str | None) -> bool:
    """Whether the tab can run queries; otherwise says why (the sidebar's problem, if any)."""
    if problem:
        st.error(problem, icon=":material/cloud_off:")
        return False
    if backend is None:
        st.info("Start the in-process controller in the sidebar (it loads the model), or choose a server.")
        return False
    return True


def collection_picker(backend: QueryBackend, key: str) -> str | None:
    """A collection of the backend; None (with the reason shown) when there is none."""
    try:
        names = backend.collections()
    except BackendError as exc:
        st.error(str(exc), icon=":material/cloud_off:")
        return None
    if not names:
        st.warning(f"The {backend.label} has no collections yet: add one with "
                   "`ragserve ingest PATH --collection NAME` (or POST /v1/collections/NAME/documents).")
        return None
    return st.selectbox("Collection", names, key=key)


def plan_picker(label: str, key: str, index: int = 0) -> str | None:
    """A plan string, or None to let METIS choose. A typed plan overrides the list."""
    chosen = st.selectbox(label, PLANS, index=index, key=key)
    typed = st.text_input("or type a plan: method:chunks, or map_reduce/refine:chunks:summary tokens",
                          key=f"{key}_typed", placeholder="stuff:3")
    if typed.strip():
        return typed.strip()
    return None if chosen == AUTO else chosen


def render_decision(info: PlanInfo) -> None:
    c1, c2, c3 = st.columns(3)
    c1.metric("Chosen plan", info.plan)
    c2.metric("Why", info.reason or "given")
    c3.metric("Free KV at admission", f"{info.kv_free_tokens:,}" if info.kv_free_tokens is not None else "–")
    st.markdown(explain(info))
    if info.profile:
        left, right = st.columns(2)
        with left:
            st.markdown("**Query profile**")
            st.table({"dimension": [k for k, _ in profile_rows(info.profile)],
                      "value": [v for _, v in profile_rows(info.profile)]})
        with right:
            st.markdown("**Pruned plans** (METIS' candidates)")
            st.markdown("\n".join(f"- `{p}`" + (" ← chosen" if p == info.plan else "") for p in info.pruned)
                        or "–")
            if info.fallback:
                st.caption(f"fallback method: {info.fallback}")


def render_chunks(info: PlanInfo, key: str) -> None:
    st.markdown("**Chunks used**")
    st.dataframe([{"rank": i + 1, "score": round(c.score, 4), "id": c.id, "title": c.title,
                   "text": c.text[:240]} for i, c in enumerate(info.chunks)], hide_index=True, key=key)


def render_timings(outcomes: list[QueryOutcome], key: str) -> None:
    rows = [(o.label or "query", stage_breakdown(o.timings)) for o in outcomes]
    st.plotly_chart(stage_figure(rows), key=key)


def stream_query(backend: QueryBackend, question: str, collection: str, plan: str | None,
                 slo_ms: float | None = None, blend: bool = False, label: str = "",
                 show_decision: bool = True, key: str = "query") -> QueryOutcome | None:
    """Run the query, drawing the decision when it arrives and the answer as it streams
    (in a container keyed `<key>_answer`). Returns None (after showing the error) when it fails."""
    decision_box = st.container()
    st.markdown("**Answer**")
    answer_box = st.container(key=f"{key}_answer").empty()
    answer_box.caption("retrieving and planning…")
    text = ""
    done: dict[str, Any] | None = None
    try:
        for name, body in backend.query_stream(question, collection, plan, slo_ms, blend):
            if name == "plan" and show_decision:
                with decision_box:
                    render_decision(plan_info(body))
            elif name == "token":
                text += body.get("text", "")
                answer_box.markdown(text + " ▌")
            elif name == "done":
                done = body
    except BackendError as exc:
        answer_box.empty()
        st.error(str(exc), icon=":material/cloud_off:")
        return None
    if done is None:
        st.error("The query ended without an answer.")
        return None
    result = outcome(question, done, label)
    answer_box.markdown(result.answer or "_(empty answer)_")
    return result
