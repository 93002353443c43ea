"""One table over several `ragserve eval` runs: the headline of each dataset side by side.

    python eval/summarize_evals.py eval/results/squad-qwen eval/results/2wikimultihopqa-qwen ... \
        --out eval/results/eval_summary_qwen

Reads each run's report.json (written by `ragserve eval`) and writes OUT.json + OUT.md.
Nothing is recomputed: the numbers are the reports' own summaries and headline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ragserve.eval.report import EQUAL_QUALITY_TOL, fmt_num


def summarize_run(report: dict[str, Any]) -> dict[str, Any]:
    meta, systems, h = report["meta"], report["systems"], report["headline"]
    m = h.get("metis") or {}
    best = h.get("best_fixed") or {}
    near = m.get("fixed_at_similar_latency") or {}
    equal = m.get("fixed_at_equal_quality", "absent")   # absent: a report from before this field

    def point(name: str) -> dict[str, Any] | None:
        s = systems.get(name)
        return None if s is None else {"quality": s["quality"], "mean_latency_s": s["total_s"]["mean"],
                                       "num": s["num"], "errors": s["num_errors"]}

    learned = (meta.get("metis") or {}).get("learned_profiler")
    return {"dataset": meta["dataset"], "model": meta["model"], "num": meta["num"],
            "profiler": "learned" if learned else "LLM", "learned_profiler": learned,
            "rate_qps": meta["rate_qps"], "quality_metric": meta["quality_metric"],
            "fixed_grid": meta.get("fixed_grid"), "command": meta.get("command"),
            "best_fixed": best or None, "metis": point("metis"), "adaptive": point("adaptive"),
            "fixed_at_equal_quality": equal, "fixed_at_similar_latency": near or None,
            "vs_adaptive": m.get("vs_adaptive")}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["# ragserve eval summary", "",
             "Quality is each dataset's metric (F1; ROUGE-L for qmsum; numeric match or F1 for financebench);",
             "latency is the mean from arrival to answer, queueing included. `equal quality` = the fastest",
             f"fixed plan within {EQUAL_QUALITY_TOL} of metis' quality or above it; `similar latency` = the fixed plan whose",
             "mean latency is closest to metis'.", "",
             "| dataset | profiler | N | q/s | best fixed | metis | adaptive | metis / fixed at equal quality | "
             "gain vs fixed at similar latency |",
             "|---|---|---:|---:|---|---|---|---|---|"]
    for r in rows:
        b, m, a = r["best_fixed"] or {}, r["metis"] or {}, r["adaptive"] or {}
        eq, near = r["fixed_at_equal_quality"], r["fixed_at_similar_latency"] or {}
        cell = lambda p: f"{fmt_num(p.get('quality'))} @ {fmt_num(p.get('mean_latency_s'), 1)} s" if p else "—"
        best = f"`{b['system']}` {cell(b)}" if b else "—"
        eq_cell = ("—" if eq == "absent" else "no fixed plan reaches it" if eq is None
                   else f"{fmt_num(eq['latency_ratio'], 2)} (`{eq['system']}`)")
        rel = near.get("quality_gain_rel")
        near_cell = (f"{rel:+.1%} (`{near['system']}`, {fmt_num(near.get('quality_gain'))} abs.)"
                     if rel is not None else "—")
        lines.append(f"| {r['dataset']} | {r['profiler']} | {r['num']} | {fmt_num(r['rate_qps'])} | {best} | {cell(m)} | {cell(a)} | "
                     f"{eq_cell} | {near_cell} |")
    lines += ["", "Commands:", ""] + [f"- {r['dataset']} ({r['profiler']} profiler): `{r['command']}`"
                                      for r in rows] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="eval output directories (each holds report.json)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        path = run / "report.json"
        if not path.is_file():
            print(f"error: {path} does not exist; run `ragserve eval ... --out {run}` first", file=sys.stderr)
            return 2
        rows.append(summarize_run(json.loads(path.read_text())))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    table = render(rows)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
