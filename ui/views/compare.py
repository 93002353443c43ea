"""Compare tab: one question under two settings (plans, CacheBlend on/off), side by side.

The two runs go one after the other, so neither slows the other down on a shared engine."""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from ui.backend import QueryBackend
from ui.outcome import QueryOutcome
from ui.views.common import PLANS, collection_picker, plan_picker, render_timings, stream_query, usable

LAST = "cmp_last"


@dataclass(frozen=True)
class Side:
    name: str              # "A" | "B"
    plan: str | None       # None: METIS chooses
    blend: bool

    @property
    def label(self) -> str:
        return f"{self.name}: {self.plan or 'auto'}" + (" + CacheBlend" if self.blend else "")


def quality(answer: str, references: list[str]) -> float | None:
    """Token F1 against the best reference (SQuAD normalisation); None without references."""
    from ragserve.metrics import best_f1

    return best_f1(answer, references) if references else None


def _table(results: list[QueryOutcome], references: list[str]) -> None:
    def fmt(x: float | None, digits: int = 3) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    rows = {"measure": ["plan", "why", "F1 vs reference", "total s", "TTFT s", "prompt tokens",
                        "output tokens", "LLM calls", "answer"]}
    for r in results:
        rows[r.label] = [r.info.plan, r.info.reason or "given", fmt(quality(r.answer, references)),
                         fmt(r.timings.get("total_s"), 2), fmt(r.timings.get("ttft_s"), 2), str(r.prompt_tokens),
                         str(r.output_tokens), str(r.num_calls), r.answer]
    st.table(rows)
    if len(results) == 2 and results[0].timings.get("total_s") and results[1].timings.get("total_s"):
        a, b = results
        ratio = b.timings["total_s"] / a.timings["total_s"]
        text = f"B takes {ratio:.2f}× the time of A"
        qa, qb = quality(a.answer, references), quality(b.answer, references)
        if qa is not None and qb is not None:
            text += f"; F1 {qb - qa:+.3f} (B − A)"
        st.caption(text + ".")


def render(backend: QueryBackend | None, problem: str | None = None) -> None:
    st.subheader("Compare two settings")
    if not usable(backend, problem):
        return
    assert backend is not None
    collection = collection_picker(backend, key="cmp_collection")
    question = st.text_area("Question", key="cmp_question", height=80)
    refs = st.text_input("Reference answer(s), separated by | (optional: scores F1)", key="cmp_reference")
    references = [r.strip() for r in refs.split("|") if r.strip()]
    sides = []
    for col, name, index in zip(st.columns(2), "AB", (PLANS.index("stuff:1"), PLANS.index("stuff:4"))):
        with col:
            st.markdown(f"**Setting {name}**")
            plan = plan_picker(f"Plan {name}", key=f"cmp_plan_{name}", index=index)
            blend = st.toggle("CacheBlend (reuse chunk KV)", key=f"cmp_blend_{name}")
            sides.append(Side(name, plan, blend))
    if st.button("Run both", type="primary", key="cmp_run", disabled=collection is None):
        if not question.strip():
            st.warning("Type a question first.")
            return
        results = []
        for col, side in zip(st.columns(2), sides):
            with col:
                st.markdown(f"**{side.label}**")
                result = stream_query(backend, question.strip(), collection or "", side.plan, blend=side.blend,
                                      label=side.label, show_decision=False, key=f"cmp_{side.name}")
            if result is not None:
                results.append(result)
        st.session_state[LAST] = (results, references)
    elif LAST in st.session_state:
        results, references = st.session_state[LAST]
    else:
        return
    if results:
        _table(results, references)
        render_timings(results, key="cmp_stages")
