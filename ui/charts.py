"""Plotly figures: the quality-latency scatter with its frontier, stage timings, engine load."""
from __future__ import annotations

import html
from datetime import datetime
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.backend import LoadSample
from ui.data import TradeoffPoint
from ui.outcome import STAGES

FRONTIER_NAME = "Pareto frontier"
MAX_LABELLED = 10   # more points than this: label only the frontier and the non-fixed systems
KIND_STYLE = {   # kind -> (marker symbol, colour, legend name)
    "fixed": ("circle", "#1f77b4", "fixed plan"),
    "plan": ("circle", "#1f77b4", "plan"),
    "adaptive": ("square", "#ff7f0e", "adaptive (AdaptiveRAG*)"),
    "metis": ("diamond", "#d62728", "metis"),
    "metis+blend": ("cross", "#9467bd", "metis + CacheBlend"),
    "oracle": ("star", "#2ca02c", "per-query best plan (oracle)"),
}
STAGE_COLOURS = ("#8c564b", "#e377c2", "#7f7f7f", "#1f77b4", "#2ca02c")


def _hover(p: TradeoffPoint, metric_label: str, value: float | None) -> str:
    plans = ", ".join(f"{plan} ×{n}" for plan, n in p.plans[:4])
    examples = "<br>".join("• " + html.escape(q[:90]) for q in p.examples)
    err = f" ({p.num_errors} failed)" if p.num_errors else ""
    return (f"<b>{html.escape(p.name)}</b> — {html.escape(p.source)}<br>"
            f"plan: {html.escape(plans)}<br>"
            f"{metric_label} {value:.3f} · mean latency {p.latency_s:.2f} s · {p.num} queries{err}<br>"
            f"examples:<br>{examples}")


def tradeoff_figure(points: Sequence[TradeoffPoint], metric: str = "f1", metric_label: str = "F1") -> go.Figure:
    """Mean `metric` vs mean latency, one trace per kind; the frontier as a dashed step line,
    its points ringed in black. Hovering a point shows its plans and example queries."""
    fig = go.Figure()
    shown = [p for p in points if p.latency_s is not None and getattr(p, metric) is not None]
    sources = sorted({p.source for p in shown})
    crowded = len(shown) > MAX_LABELLED   # then only the frontier and the adaptive systems get labels
    texts = {p.key: _label(p, len(sources) > 1, crowded) for p in shown}
    where = label_positions([(p.key, p.latency_s, getattr(p, metric), texts[p.key]) for p in shown])
    for kind in dict.fromkeys(p.kind for p in shown):
        members = [p for p in shown if p.kind == kind]
        symbol, colour, name = KIND_STYLE.get(kind, ("circle-open", "#17becf", kind))
        fig.add_trace(go.Scatter(
            x=[p.latency_s for p in members], y=[getattr(p, metric) for p in members],
            mode="markers+text", name=name, text=[texts[p.key] for p in members],
            textposition=[where[p.key] for p in members], textfont={"size": 10},
            marker={"symbol": symbol, "color": colour, "size": 12,
                    "line": {"width": [2.5 if p.on_frontier else 0 for p in members], "color": "black"}},
            hovertext=[_hover(p, metric_label, getattr(p, metric)) for p in members], hoverinfo="text",
            customdata=[p.key for p in members]))
    front = sorted((p for p in shown if p.on_frontier), key=lambda p: p.latency_s or 0.0)
    if front:
        fig.add_trace(go.Scatter(
            x=[p.latency_s for p in front], y=[getattr(p, metric) for p in front], mode="lines",
            line={"shape": "hv", "dash": "dash", "color": "gray"}, name=FRONTIER_NAME, hoverinfo="skip"))
    fig.update_layout(xaxis_title="mean latency per query (s)", yaxis_title=f"mean {metric_label}",
                      height=480, margin={"l": 10, "r": 10, "t": 30, "b": 10}, hoverlabel={"align": "left"},
                      legend={"orientation": "h", "y": -0.18})
    return fig


# Label placement, in fractions of the plot's axis ranges (a 10 px font on a ~1300 x 400 px plot).
_CHAR_W, _LABEL_H, _MARKER_W, _MARKER_H = 0.0055, 0.05, 0.006, 0.02
_POSITIONS = ("top center", "bottom center", "middle right", "middle left")


def label_positions(points: Sequence[tuple[str, float, float, str]]) -> dict[str, str]:
    """A plotly textposition per point (key, x, y, label) so labels overlap neither each other
    nor markers: top center where free, else below, right or left (greedy, top points first)."""
    if not points:
        return {}
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    norm = {key: ((x - min(xs)) / span_x, (y - min(ys)) / span_y) for key, x, y, _ in points}
    taken = [(nx - _MARKER_W, ny - _MARKER_H, nx + _MARKER_W, ny + _MARKER_H) for nx, ny in norm.values()]
    out: dict[str, str] = {}
    for key, _, _, text in sorted(points, key=lambda p: -p[2]):
        if not text:
            out[key] = "top center"
            continue
        nx, ny = norm[key]
        w = len(text) * _CHAR_W
        boxes = {"top center": (nx - w / 2, ny + _MARKER_H, nx + w / 2, ny + _MARKER_H + _LABEL_H),
                 "bottom center": (nx - w / 2, ny - _MARKER_H - _LABEL_H, nx + w / 2, ny - _MARKER_H),
                 "middle right": (nx + _MARKER_W, ny - _LABEL_H / 2, nx + _MARKER_W + w, ny + _LABEL_H / 2),
                 "middle left": (nx - _MARKER_W - w, ny - _LABEL_H / 2, nx - _MARKER_W, ny + _LABEL_H / 2)}
        free = [pos for pos in _POSITIONS if not any(_overlap(boxes[pos], b) for b in taken)]
        out[key] = free[0] if free else "top center"
        taken.append(boxes[out[key]])
    return out


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label(p: TradeoffPoint, with_source: bool, crowded: bool) -> str:
    if crowded and not p.on_frontier and p.kind in ("fixed", "plan"):
        return ""
    name = p.name.removeprefix("fixed:")
    return f"{name} ({p.source.rsplit('/', 1)[-1]})" if with_source else name


def stage_figure(rows: Sequence[tuple[str, Sequence[tuple[str, float]]]]) -> go.Figure:
    """One horizontal stacked bar per query (label, [(stage, seconds)]), stages in order."""
    fig = go.Figure()
    labels = [label for label, _ in rows]
    for i, stage in enumerate(STAGES):
        values = [dict(stages).get(stage, 0.0) for _, stages in rows]
        fig.add_trace(go.Bar(y=labels, x=values, name=stage, orientation="h",
                             marker_color=STAGE_COLOURS[i % len(STAGE_COLOURS)],
                             hovertemplate=f"{stage}: %{{x:.3f}} s<extra></extra>"))
    fig.update_layout(barmode="stack", xaxis_title="seconds", height=140 + 50 * len(rows),
                      yaxis={"autorange": "reversed"},   # the first query on top
                      margin={"l": 10, "r": 10, "t": 10, "b": 10},
                      legend={"orientation": "h", "y": -0.4, "traceorder": "normal"})
    return fig


def load_figure(samples: Sequence[LoadSample]) -> go.Figure:
    """KV in use (tokens, with capacity) above, running / waiting calls and queries below."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("engine KV (tokens)", "calls and queries"))
    times = [datetime.fromtimestamp(s.t) for s in samples]
    fig.add_trace(go.Scatter(x=times, y=[s.kv_used_tokens for s in samples], name="KV used",
                             fill="tozeroy", line={"color": "#1f77b4"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=times, y=[s.kv_capacity_tokens for s in samples], name="KV capacity",
                             line={"color": "gray", "dash": "dot"}), row=1, col=1)
    for attr, name, colour in (("num_running", "engine calls running", "#2ca02c"),
                               ("num_waiting", "engine calls waiting", "#ff7f0e"),
                               ("sched_waiting", "queries waiting for KV (METIS)", "#d62728")):
        fig.add_trace(go.Scatter(x=times, y=[getattr(s, attr) for s in samples], name=name,
                                 line={"color": colour, "shape": "hv"}), row=2, col=1)
    fig.update_layout(height=460, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h"})
    return fig
