"""Evaluation reports: per-system summaries, headline comparisons, JSON + markdown + PNG.

`summarize` turns per-query rows (ragserve.eval.runner) into one summary per system;
`headline` compares metis with the baselines the way METIS §7 does (best fixed plan,
fixed plan at similar delay, AdaptiveRAG*); `pareto_frontier` finds the systems no other
beats on both quality and mean latency. `write_eval_report` writes, under the output dir:

    report.json   meta (exact command, git commit, versions, settings) + summaries + headline
    rows.jsonl    one line per (system, query)
    report.md     the same as tables
    quality_vs_latency.png   primary quality vs mean latency, one point per system/plan,
                             Pareto frontier drawn (and f1_vs_latency.png when the primary
                             metric is not F1)

Pure except the writers at the bottom; matplotlib is imported only there (Agg backend).
"""
from __future__ import annotations

import json
import math
import platform
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

QUALITY_KEYS = ("quality", "f1", "em", "rouge_l", "numeric")
TIME_KEYS = ("total_s", "ttft_s", "queue_s", "profile_s")
METRIC_LABELS = {"f1": "F1", "rouge_l": "ROUGE-L", "numeric_or_f1": "numeric match (else F1)",
                 "quality": "quality", "em": "EM", "numeric": "numeric match"}


# ---------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; nan when empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _r(x: float, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary of one system's rows. Failed queries count as quality 0; times are over the
    queries that answered."""
    ok = [r for r in rows if not r.get("error")]
    out: dict[str, Any] = {"num": len(rows), "num_errors": len(rows) - len(ok)}
    for key in QUALITY_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = _r(_mean(values))
    for key in TIME_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = {"mean": _r(_mean(values)), "p50": _r(percentile(values, 50)),
                    "p95": _r(percentile(values, 95))}
    if ok:
        span = max(r["finish_s"] for r in ok) - min(r["arrival_s"] for r in rows)
        out["throughput_qps"] = _r(len(ok) / span) if span > 0 else None
        out["prompt_tokens_mean"] = _r(_mean([r["prompt_tokens"] for r in ok]), 1)
        out["output_tokens_mean"] = _r(_mean([r["output_tokens"] for r in ok]), 1)
        out["plans"] = dict(Counter(r["plan"] for r in ok).most_common())
        out["methods"] = dict(Counter(r["method"] for r in ok).most_common())
        reasons = Counter(r.get("reason") for r in ok if r.get("reason"))
        if reasons:
            out["reasons"] = dict(reasons)
        timed = [r for r in ok if r.get("est_service_s") and r.get("service_s")]
        if timed:   # the cost model's service-time estimate vs the service the plan got
            errors = [abs(r["est_service_s"] - r["service_s"]) / r["service_s"] for r in timed]
            out["service_estimate"] = {"n": len(timed), "median_abs_rel_error": _r(percentile(errors, 50)),
                                       "mean_est_s": _r(_mean([r["est_service_s"] for r in timed])),
                                       "mean_actual_s": _r(_mean([r["service_s"] for r in timed]))}
        waits = [r for r in ok if r.get("admission_s") is not None]
        if waits:
            out["wait_split_s"] = {"admission": _r(_mean([r["admission_s"] for r in waits])),
                                   "engine_queue": _r(_mean([r["engine_queue_s"] for r in waits]))}
    else:
        out["throughput_qps"] = None
    return out


def ci95(diffs: Sequence[float]) -> float:
    """Half-width of the normal 95% CI of the mean of `diffs` (nan for fewer than 2)."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = _mean(diffs)
    return 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def paired_diff(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "quality") -> dict[str, Any]:
    """Mean of a - b over the questions both answered (paired by id), with its normal 95% CI
    half-width. Failed queries count as quality 0, as in `summarize`."""
    by_id = {r["id"]: r[key] for r in b if r.get(key) is not None}
    diffs = [r[key] - by_id[r["id"]] for r in a if r.get(key) is not None and r["id"] in by_id]
    return {"n": len(diffs), "mean": _r(_mean(diffs)), "ci95": _r(ci95(diffs))}


def blend_comparison(rows_by_system: dict[str, list[dict[str, Any]]],
                     summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each `X+blend` against `X` on the same questions: paired quality difference, mean
    latency ratio, and the share of its prompt tokens the blending engine prefilled."""
    out: dict[str, Any] = {}
    for name, rows in rows_by_system.items():
        base = name[: -len("+blend")] if name.endswith("+blend") else None
        if base is None or base not in rows_by_system:
            continue
        s, b = summaries[name], summaries[base]
        lat, base_lat = s["total_s"]["mean"], b["total_s"]["mean"]
        counters = s.get("blend") or {}
        reused, equiv = counters.get("reused_tokens"), counters.get("prefill_token_equiv")
        prompt = sum(r["prompt_tokens"] for r in rows if not r.get("error"))
        out[name] = {"vs": base, "quality_diff": paired_diff(rows, rows_by_system[base]),
                     "mean_s": lat, "vs_mean_s": base_lat,
                     "latency_ratio": _r(lat / base_lat, 3) if lat and base_lat else None,
                     "blended_calls": counters.get("blended_calls"),
                     "reused_share": _r(reused / prompt, 3) if reused is not None and prompt else None,
                     # token-layers computed / a full prefill's, over all the system's prompt tokens
                     "prefill_work_share": _r((prompt - counters["blended_tokens"] + equiv) / prompt, 3)
                     if equiv is not None and "blended_tokens" in counters and prompt else None}
    return out


def pareto_frontier(points: Iterable[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, latency, quality) points no other point dominates (latency <=
    and quality >=, one of them strictly), ordered by latency."""
    pts = [(n, lat, q) for n, lat, q in points if lat is not None and q is not None
           and not math.isnan(lat) and not math.isnan(q)]
    front = [(n, lat, q) for n, lat, q in pts
             if not any((l2 <= lat and q2 >= q) and (l2 < lat or q2 > q) for _, l2, q2 in pts)]
    return [n for n, _, _ in sorted(front, key=lambda p: (p[1], -p[2]))]


EQUAL_QUALITY_TOL = 0.01   # "equal F1" in the headline: within one point
HEADLINE_SYSTEMS = ("metis", "metis+blend", "tuned", "tuned+blend")   # compared with the fixed plans


def headline(summaries: dict[str, dict[str, Any]], metric: str = "quality") -> dict[str, Any]:
    """METIS §7's comparisons, by `metric` and mean latency (absent systems are skipped).

    `fixed_at_equal_quality` is the fastest fixed plan within EQUAL_QUALITY_TOL of the
    system's quality or above it: the latency a fixed plan pays for the same quality
    (None when no fixed plan gets there)."""
    def lat(name: str) -> float:
        return summaries[name]["total_s"]["mean"]

    def qual(name: str) -> float:
        return summaries[name][metric]

    out: dict[str, Any] = {"metric": metric}
    fixed = [n for n in summaries if n.startswith("fixed:") and lat(n) is not None]
    if fixed:
        best = max(fixed, key=lambda n: (qual(n), -lat(n)))
        out["best_fixed"] = {"system": best, metric: qual(best), "mean_latency_s": lat(best)}
    for name in HEADLINE_SYSTEMS:
        if name not in summaries or lat(name) is None:
            continue
        entry: dict[str, Any] = {metric: qual(name), "mean_latency_s": lat(name)}
        if fixed:
            near = min(fixed, key=lambda n: abs(lat(n) - lat(name)))
            entry["fixed_at_similar_latency"] = {
                "system": near, metric: qual(near), "mean_latency_s": lat(near),
                "quality_gain": _r(qual(name) - qual(near)),
                "quality_gain_rel": _r(qual(name) / qual(near) - 1) if qual(near) else None}
            equal = [n for n in fixed if qual(n) >= qual(name) - EQUAL_QUALITY_TOL]
            eq = min(equal, key=lat) if equal else None
            entry["fixed_at_equal_quality"] = None if eq is None else {
                "system": eq, metric: qual(eq), "mean_latency_s": lat(eq),
                "latency_ratio": _r(lat(name) / lat(eq), 3)}
            entry["vs_best_fixed"] = {"quality_gain": _r(qual(name) - qual(out["best_fixed"]["system"])),
                                      "latency_speedup": _r(lat(out["best_fixed"]["system"]) / lat(name), 3)}
        if "adaptive" in summaries and lat("adaptive") is not None:
            entry["vs_adaptive"] = {"quality_gain": _r(qual(name) - qual("adaptive")),
                                    "latency_speedup": _r(lat("adaptive") / lat(name), 3)}
        out[name] = entry
    return out


# ---------------------------------------------------------------------------- environment

def process_cpu_s() -> float:
    """CPU seconds used by this process (all threads), user + system: with the wall time and
    the load average it says how much of the machine a run had."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def environment() -> dict[str, Any]:
    """Git commit (and whether the tree had changes), package versions, machine."""
    import importlib.metadata as md
    import os

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    versions = {"python": sys.version.split()[0]}
    for dist in ("ragserve", "torch", "transformers", "sentence-transformers", "faiss-cpu", "numpy",
                 "scikit-learn", "matplotlib", "vllm"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    status = git("status", "--porcelain")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "versions": versions, "platform": platform.platform(), "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------- writers

def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _speed(x: float | None) -> str:
    """A latency ratio (baseline / system) in words."""
    if x is None:
        return "–"
    return f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"


def markdown_table(summaries: dict[str, dict[str, Any]], frontier: Sequence[str]) -> str:
    head = ("| system | n | err | quality | F1 | EM | ROUGE-L | numeric | mean s | p50 s | p95 s | "
            "TTFT s | queue s | profile s | q/s | prompt tok | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summaries.items():
        t = s["total_s"]
        lines.append("| " + " | ".join([
            f"`{name}`", str(s["num"]), str(s["num_errors"]), fmt_num(s["quality"]), fmt_num(s["f1"]), fmt_num(s["em"]),
            fmt_num(s["rouge_l"]), fmt_num(s["numeric"]), fmt_num(t["mean"], 2), fmt_num(t["p50"], 2), fmt_num(t["p95"], 2),
            fmt_num(s["ttft_s"]["mean"], 2), fmt_num(s["queue_s"]["mean"], 2), fmt_num(s["profile_s"]["mean"], 2),
            fmt_num(s.get("throughput_qps")), fmt_num(s.get("prompt_tokens_mean"), 0),
            "★" if name in frontier else ""]) + " |")
    return "\n".join(lines)


def plot_quality_latency(path: Path, summaries: dict[str, dict[str, Any]], metric: str, title: str,
                         extra_points: dict[str, tuple[float, float]] | None = None,
                         metric_label: str | None = None) -> None:
    """One point per system (mean latency, mean `metric`), the Pareto frontier as a step line
    (its points edged in black). `extra_points` (name -> (latency, quality)) are drawn as
    stars (e.g. the per-query best plans)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(n, s["total_s"]["mean"], s[metric]) for n, s in summaries.items()
           if s["total_s"]["mean"] is not None and s.get(metric) is not None]
    pts += [(n, lat, q) for n, (lat, q) in (extra_points or {}).items()]
    frontier = pareto_frontier(pts)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    styles = {"adaptive": ("s", "tab:orange", "adaptive (AdaptiveRAG*)"), "metis": ("D", "tab:red", "metis"),
              "metis+blend": ("P", "tab:purple", "metis + CacheBlend")}
    labelled: set[str] = set()
    xr = (max(p[1] for p in pts) - min(p[1] for p in pts)) or 1.0 if pts else 1.0
    yr = (max(p[2] for p in pts) - min(p[2] for p in pts)) or 1.0 if pts else 1.0
    for i, (name, lat, q) in enumerate(pts):
        if extra_points and name in extra_points:
            marker, color, kind = "*", "tab:green", name
        else:
            marker, color, kind = styles.get(name, ("o", "tab:blue", "fixed plan"))
        ax.scatter([lat], [q], marker=marker, color=color, s=90 if marker != "o" else 50, zorder=3,
                   edgecolors="black" if name in frontier else "none", linewidths=1.2,
                   label=None if kind in labelled else kind)
        labelled.add(kind)
        label = name[len("fixed:"):] if name.startswith("fixed:") else name
        near = sum(1 for _, l2, q2 in pts[:i] if abs(l2 - lat) < 0.12 * xr and abs(q2 - q) < 0.06 * yr)
        ax.annotate(label, (lat, q), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=8)
    if frontier:
        by_name = {n: (lat, q) for n, lat, q in pts}
        xs = [by_name[n][0] for n in frontier]
        ys = [by_name[n][1] for n in frontier]
        ax.step(xs, ys, where="post", color="gray", linestyle="--", linewidth=1, zorder=1,
                label="Pareto frontier")
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("mean latency per query (s)")
    ax.set_ylabel(f"mean {metric_label or METRIC_LABELS.get(metric, metric)}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    tmp.replace(path)


def build_report(meta: dict[str, Any], rows_by_system: dict[str, list[dict[str, Any]]],
                 unavailable: dict[str, str] | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    summaries = {name: summarize(rows) for name, rows in rows_by_system.items()}
    for name, more in (extra or {}).items():
        if name in summaries and more:
            summaries[name].update(more)
    frontier = pareto_frontier((n, s["total_s"]["mean"], s["quality"]) for n, s in summaries.items())
    # the caller's environment (taken when its run started) wins over the one at write time
    report = {"format_version": 1, "meta": {**environment(), **meta}, "systems": summaries,
              "pareto_frontier": frontier, "headline": headline(summaries, "quality"),
              "headline_f1": headline(summaries, "f1"), "unavailable": unavailable or {}}
    if blended := blend_comparison(rows_by_system, summaries):
        report["blend_vs_unblended"] = blended
    return report


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    metric = METRIC_LABELS.get(meta.get("quality_metric", "f1"), meta.get("quality_metric"))
    lines = [f"# ragserve eval: {meta.get('dataset')} / {meta.get('model')} ({meta.get('engine')})", "",
             f"- command: `{meta.get('command')}`",
             f"- git: `{meta.get('git_commit')}`{' (uncommitted changes)' if meta.get('git_dirty') else ''}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
             f"- machine: {meta.get('platform')}, {meta.get('cpu_count')} CPUs",
             f"- workload: {meta.get('num')} queries, Poisson arrivals at {fmt_num(meta.get('rate_qps'))} q/s "
             f"(seed {meta.get('seed')}); collection `{meta.get('collection')}` "
             f"({meta.get('corpus', {}).get('chunks')} chunks{', corpus SUBSET' if meta.get('corpus', {}).get('subset') else ''})",
             f"- quality = {metric}; latency = launch at arrival -> answer (includes queueing)", ""]
    lines += ["## Systems", "", markdown_table(report["systems"], report["pareto_frontier"]), ""]
    h = report["headline"]
    lines += ["## Headline", ""]
    if "best_fixed" in h:
        b = h["best_fixed"]
        lines.append(f"- best fixed plan: `{b['system']}` quality {fmt_num(b['quality'])}, "
                     f"{fmt_num(b['mean_latency_s'], 2)} s")
    for name in HEADLINE_SYSTEMS:
        e = h.get(name)
        if not e:
            continue
        lines.append(f"- {name}: quality {fmt_num(e['quality'])}, {fmt_num(e['mean_latency_s'], 2)} s")
        if "fixed_at_similar_latency" in e:
            f = e["fixed_at_similar_latency"]
            rel = f"{f['quality_gain_rel']:+.1%}" if f.get("quality_gain_rel") is not None else "n/a"
            lines.append(f"  - vs fixed at similar latency `{f['system']}` ({fmt_num(f['mean_latency_s'], 2)} s): "
                         f"quality {fmt_num(f['quality_gain'], 3)} (absolute), {rel} (relative)")
            q = e.get("fixed_at_equal_quality")
            lines.append(f"  - no fixed plan reaches its quality (within {EQUAL_QUALITY_TOL})" if q is None else
                         f"  - vs the fastest fixed plan at equal quality (within {EQUAL_QUALITY_TOL}) `{q['system']}` "
                         f"({fmt_num(q['mean_latency_s'], 2)} s): latency ratio {fmt_num(q['latency_ratio'], 3)}")
            v = e["vs_best_fixed"]
            lines.append(f"  - vs best fixed: quality {fmt_num(v['quality_gain'], 3)}, {_speed(v['latency_speedup'])}")
        if "vs_adaptive" in e:
            v = e["vs_adaptive"]
            lines.append(f"  - vs adaptive (AdaptiveRAG*): quality {fmt_num(v['quality_gain'], 3)}, "
                         f"{_speed(v['latency_speedup'])}")
    for name, why in report.get("unavailable", {}).items():
        lines.append(f"- `{name}`: {why}")
    if blended := report.get("blend_vs_unblended"):
        lines += ["", "## Blending (CacheBlend) against the same system unblended", "",
                  "| system | vs | n | quality diff ± 95% CI | mean s | vs mean s | latency ratio | blended calls "
                  "| prompt tokens reused | prefill work |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in blended.items():
            d = c["quality_diff"]
            lines.append(f"| `{name}` | `{c['vs']}` | {d['n']} | {fmt_num(d['mean'])} ± {fmt_num(d['ci95'])} | "
                         f"{fmt_num(c['mean_s'], 2)} | {fmt_num(c['vs_mean_s'], 2)} | {fmt_num(c['latency_ratio'])} | "
                         f"{fmt_num(c['blended_calls'])} | {fmt_num(c['reused_share'])} | {fmt_num(c['prefill_work_share'])} |")
    lines += ["", "Plots: `quality_vs_latency.png`" +
              (", `f1_vs_latency.png`" if meta.get("quality_metric", "f1") != "f1" else ""), ""]
    return "\n".join(lines)


def write_eval_report(out: Path, meta: dict[str, Any], runs: Sequence[Any],
                      unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """Write report.json, rows.jsonl, report.md and the plots under `out`; return the report."""
    out = Path(out)
    rows_by_system = {run.system.name: run.rows for run in runs}
    extra = {run.system.name: {**run.extra, "wall_s": round(run.wall_s, 2)} for run in runs}
    report = build_report(meta, rows_by_system, unavailable, extra)
    write_json(out / "report.json", report)
    write_jsonl(out / "rows.jsonl", (row for run in runs for row in run.rows))
    title = f"{meta.get('dataset')} / {meta.get('model')}: {meta.get('num')} queries at {fmt_num(meta.get('rate_qps'), 2)} q/s"
    if report["systems"]:
        primary = METRIC_LABELS.get(meta.get("quality_metric", "f1"), "quality")
        plot_quality_latency(out / "quality_vs_latency.png", report["systems"], "quality", title,
                             metric_label=primary)
        if meta.get("quality_metric", "f1") != "f1":
            plot_quality_latency(out / "f1_vs_latency.png", report["systems"], "f1", title)
    (out / "report.md").write_text(render_markdown(report))
    return report
