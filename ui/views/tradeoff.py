"""Trade-off tab: load eval runs / tuning sweeps, filter, scatter F1 vs latency with the frontier."""
from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st

from ui.charts import tradeoff_figure
from ui.data import (Filters, ResultFileError, ResultRow, ResultSet, TradeoffPoint, default_set, discover,
                     filter_options,
                     filter_rows, load_result_set, rows_of, tradeoff_points)

METRICS = {"f1": "F1", "quality": "primary quality"}


@st.cache_data(show_spinner=False, max_entries=64)
def _load_cached(path: str, label: str, stamp: tuple[float, ...]) -> ResultSet:
    """`stamp` (file mtimes) keys the cache so a rewritten result is read again."""
    return load_result_set(Path(path), label)


def _stamp(path: Path) -> tuple[float, ...]:
    return tuple(p.stat().st_mtime for p in sorted(path.glob("*.json*")) if p.is_file())


def _label(path: Path, repo: Path) -> str:
    try:
        return str(path.resolve().relative_to(repo.resolve()))
    except ValueError:
        return str(path)


def load_sets(paths: list[Path], repo: Path) -> list[ResultSet]:
    """Each loadable set; a broken one is reported (file and problem), the others still load."""
    sets = []
    for path in paths:
        try:
            sets.append(_load_cached(str(path), _label(path, repo), _stamp(path) if path.is_dir() else ()))
        except ResultFileError as exc:
            st.error(f"Could not load the result file {exc.path}: {exc.problem}", icon=":material/error:")
        except Exception as exc:   # an unforeseen shape: still a message, not a traceback
            st.error(f"Could not load the results in {path}: {type(exc).__name__}: {exc}", icon=":material/error:")
    return sets


def _filters(rows: list[ResultRow]) -> Filters:
    options = filter_options(rows)
    cols = st.columns(4)
    names = (("datasets", "Dataset"), ("query_types", "Query type"), ("methods", "Method"),
             ("num_chunks", "Chunks"))
    chosen = {}
    for col, (field, label) in zip(cols, names):
        # The key carries the options: other result sets start from all values selected,
        # instead of keeping a selection made among values they do not have.
        digest = hashlib.sha1(repr(options[field]).encode()).hexdigest()[:8]
        with col:
            chosen[field] = frozenset(st.multiselect(label, options[field], default=options[field],
                                                     key=f"tr_filter_{field}_{digest}"))
    return Filters(**chosen)


def _table(points: list[TradeoffPoint], metric: str) -> None:
    st.dataframe([{"result set": p.source, "system / plan": p.name, "kind": p.kind, "queries": p.num,
                   "failed": p.num_errors, METRICS[metric]: _round(getattr(p, metric)),
                   "mean latency s": _round(p.latency_s, 2), "frontier": "★" if p.on_frontier else "",
                   "plans run": ", ".join(f"{plan}×{n}" for plan, n in p.plans)} for p in points],
                 hide_index=True, key="tr_table")


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _inspect(rows: list[ResultRow], points: list[TradeoffPoint], group_by: str) -> None:
    by_key = {p.key: p for p in points}
    front = [p.key for p in points if p.on_frontier]
    key = st.selectbox("Inspect a point (its queries)", list(by_key),
                       index=list(by_key).index(front[0]) if front else 0, key="tr_inspect")
    point = by_key[key]
    st.caption(f"plans run: {', '.join(f'{plan} ×{n}' for plan, n in point.plans)}")
    st.dataframe([{"question": r.question or f"id {r.query_id}", "type": r.query_type, "plan": r.plan,
                   "answer": r.answer, "F1": _round(r.f1), "quality": _round(r.quality),
                   "latency s": _round(r.latency_s, 2), "error": r.error or ""}
                  for r in rows_of(rows, point, group_by)], hide_index=True, key="tr_rows")


def render(repo: Path) -> None:
    st.subheader("Quality vs latency")
    found = {_label(p, repo): p for p in discover(repo)}
    first = default_set(list(found.values()))
    chosen = st.multiselect("Result sets (eval/results runs, profiles/ sweeps)", list(found),
                            default=[_label(first, repo)] if first else [], key="tr_sources",
                            help="Opens on the largest (then newest) set; add more to compare them on one chart.")
    extra = st.text_input("Another result directory (an eval run or a tuning sweep)", key="tr_extra",
                          placeholder="eval/results/squad-qwen or /path/to/profiles/qwen/squad")
    paths = [found[label] for label in chosen]
    if extra.strip():
        path = Path(extra.strip()).expanduser()
        path = path if path.is_absolute() else repo / path
        if path.resolve() not in {p.resolve() for p in paths}:   # the same set twice would count twice
            paths.append(path)
    sets = load_sets(paths, repo)
    if not sets:
        st.info("Choose a result set: `ragserve eval ... --out eval/results/NAME` or `ragserve tune` write them.")
        return
    st.caption(" · ".join(f"{s.label}: {s.kind}, {s.dataset}/{s.model}, {len(s.rows)} rows" for s in sets))
    c1, c2 = st.columns(2)
    group_by = c1.radio("One point per", ["system", "plan"], horizontal=True, key="tr_group")
    metric = c2.radio("Quality", list(METRICS), format_func=METRICS.get, horizontal=True, key="tr_metric")
    rows = [r for s in sets for r in s.rows]
    kept = filter_rows(rows, _filters(rows))
    points = tradeoff_points(kept, group_by, metric)
    if not any(p.latency_s is not None for p in points):
        st.warning("No answered query matches these filters.")
        return
    st.plotly_chart(tradeoff_figure(points, metric, METRICS[metric]), key="tr_chart")
    many = len(sets) > 1
    front = [p.key if many else p.name for p in sorted(points, key=lambda p: p.latency_s or 0) if p.on_frontier]
    st.markdown("**Pareto frontier:** " + (", ".join(f"`{n}`" for n in front) or "–"))
    _table(points, metric)
    _inspect(kept, points, group_by)
