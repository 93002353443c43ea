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
    for kind in dict.fromkeys(p.kind for p in shown):
        members = [p for p in shown if p.kind == kind]
        symbol, colour, name = KIND_STYLE.get(kind, ("circle-open", "#17becf", kind))
        fig.add_trace(go.Scatter(
            x=[p.latency_s for p in members], y=[getattr(p, metric) for p in members],
            mode="markers+text", name=name, text=[_label(p, len(sources) > 1, crowded) for p in members],
            textposition="top center", textfont={"size": 10},
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
