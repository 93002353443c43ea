"""Controller sweep: quality, latency, SLO attainment and goodput of every system across load.

Simulated points (source "sim") replay Poisson traces of a sweep's queries through the real
scheduler and decision rule (ragserve/eval/simulator.py) with the sweep's measured quality per
(query, plan), cross-fitted quality predictions, and engine speeds fitted to the sweep's idle
latencies. Real points (source "real") are read from `ragserve eval` result dirs (--real);
each is also replayed (source "replay"): its own arrivals, plans and token counts through the
simulated engine at the speeds it measured, which checks the engine model alone.

    python eval/controller_sweep.py --profiles profiles/qwen/squad profiles/qwen/2wikimultihopqa \
        --out eval/results/controller_sweep [--real eval/results/tuned-squad-1.5x ...]

Writes OUT.json ({"points": [...], "targets": [...], ...}), OUT.md, and OUT-<dataset>.png.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragserve.config import TunedConfig  # noqa: E402
from ragserve.domain import EngineSpeeds, ModelSpec, RagPlan  # noqa: E402
from ragserve.eval.quality_training import choose_adjust, cross_fit, retrieval_summaries, training_data  # noqa: E402
from ragserve.eval.simulator import (Outcome, SimQuery, SimSettings, SimSystem, fit_overhead_tokens, fit_speeds,  # noqa: E402
                                     sim_queries, simulate, summarize)
from ragserve.eval.report import ci95, percentile  # noqa: E402
from ragserve.eval.tuning import read_profile  # noqa: E402
from ragserve.metis.cost import CostConfig  # noqa: E402

RATE_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)
EQUAL_QUALITY = 0.01
# KV geometry of the registry models: (layers, KV heads, head dim).
GEOMETRY = {"qwen": (24, 2, 64), "smollm2": (30, 3, 64)}


def run_system(queries, system, rate, settings, reps, slo_s):
    """Mean over `reps` shuffled traces; per-query quality averaged over reps (for paired CIs)."""
    per_query: dict[str, list[float]] = {}
    summaries = []
    for rep in range(reps):
        order = list(queries)
        random.Random(f"order:{rep}").shuffle(order)
        rows = simulate(order, system, rate, settings, seed=rep)
        summaries.append(summarize(rows, slo_s))
        for r in rows:
            per_query.setdefault(r.query_id, []).append(r.quality)
    out = {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0] if k != "n"}
    out["n"] = len(per_query)
    out["per_query"] = {q: float(np.mean(v)) for q, v in per_query.items()}
    return out


def measured_speeds(run_dir: Path) -> EngineSpeeds:
    """The engine speeds an eval run measured (its last system's)."""
    report = json.loads((run_dir / "report.json").read_text())
    for s in reversed(list(report["systems"].values())):
        if s.get("engine_speeds"):
            return EngineSpeeds.from_dict(s["engine_speeds"])
    raise SystemExit(f"{run_dir}: no engine_speeds in report.json (a run from before speeds were measured)")


def for_dataset(specs: list[str], dataset: str, option: str) -> str | None:
    """An option's value for `dataset`: its DATASET=VALUE entry, else the one bare VALUE (every
    dataset), else None."""
    named = dict(s.split("=", 1) for s in specs if "=" in s)
    bare = [s for s in specs if "=" not in s]
    if len(bare) > 1:
        raise SystemExit(f"{option}: at most one value for all datasets, got {bare}; name the others DATASET=VALUE")
    return named.get(dataset, bare[0] if bare else None)


def kv_dtype_bytes(args, dataset: str) -> int:
    return int(for_dataset(args.dtype_bytes, dataset, "--dtype-bytes") or 4)


def real_rates(specs: list[str]) -> dict[str, list[tuple[float, float]]]:
    """dataset -> [(rate factor, absolute rate q/s)] of the real runs given as FACTOR=DIR."""
    out: dict[str, list[tuple[float, float]]] = {}
    for spec in specs:
        factor, _, d = spec.partition("=")
        meta = json.loads((Path(d) / "report.json").read_text())["meta"]
        out.setdefault(meta["dataset"], []).append((float(factor), float(meta["rate_qps"])))
    return out


def dataset_points(profile: Path, args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    meta, records = read_profile(profile)
    retrieval = retrieval_summaries(profile)
    data = training_data([profile])
    adjustment = choose_adjust(data, args.folds)   # as train-quality decides it
    pred = cross_fit(data, k=args.folds, adjust=adjustment["adjust"])
    predicted = {(data.query_ids[g].split(":", 1)[1], str(p)): float(v)
                 for g, p, v in zip(data.groups, data.plans, pred)}
    queries = sim_queries(records, retrieval, predicted)
    sweep = (meta.machine_load or {}).get("sweep") or {}
    if sweep.get("concurrency", 1) > 1 and sweep.get("engine_speeds"):
        speeds = EngineSpeeds.from_dict(sweep["engine_speeds"])   # its latencies were under load
    else:
        speeds = fit_speeds(records)
    source = for_dataset(args.speeds_from, meta.dataset, "--speeds-from")
    if source:
        speeds = measured_speeds(Path(source))
    model = ModelSpec(meta.model, *GEOMETRY[meta.model], kv_dtype_bytes(args, meta.dataset), 8192)
    kv_tokens = int(args.kv_budget_mb * 2**20 // model.kv_bytes_per_token)
    overhead = args.overhead_tokens if args.overhead_tokens is not None else fit_overhead_tokens(queries, model)
    engines = {"cpu": (speeds, kv_tokens)}
    if args.gpu_whatif:
        # GPU-like: prefill ~50x, a decode step ~10x faster, extra rows nearly free; KV binds.
        gpu = EngineSpeeds(speeds.prefill_tok_s * 50, speeds.step_base_s / 10, speeds.step_base_s / 2000,
                           output_tokens=speeds.output_tokens)
        engines["gpu-whatif"] = (gpu, args.gpu_kv_tokens)
    grid = sorted({p for q in queries for p in q.outcomes}, key=str)
    points, info = [], {"dataset": meta.dataset, "num_queries": len(queries), "speeds": speeds.to_dict(),
                        "overhead_tokens_per_call": overhead,
                        "kv_capacity_tokens": kv_tokens, "engines": {}, "quality_adjustment": adjustment}
    for engine_name, (sp, kv) in engines.items():
        settings = SimSettings(speeds=sp, kv_capacity_tokens=kv, model=model, answer_tokens=args.answer_tokens,
                               overhead_tokens_per_call=overhead,
                               rule=TunedConfig(time_value=args.time_value, slack=args.slack))
        idle = {str(p): run_system(queries, SimSystem(f"fixed:{p}", p), 1e-4, settings, 1, None) for p in grid}
        best_fixed = max(idle, key=lambda k: (idle[k]["quality"], -idle[k]["mean_s"]))
        capacity = 1.0 / idle[best_fixed]["mean_s"]
        slo_s = 3.0 * idle[best_fixed]["mean_s"]
        info["engines"][engine_name] = {"best_fixed": best_fixed, "capacity_qps": capacity, "slo_s": slo_s,
                                        "speeds": sp.to_dict(), "kv_capacity_tokens": kv}
        systems = [SimSystem(f"fixed:{p}", p) for p in grid] + [SimSystem("metis"), SimSystem("tuned")]
        # the curve relative to this engine's capacity, and (CPU engine) each real run's own rate,
        # which is what validates the simulator against it
        at_real = [(f, r, True) for f, r in args.real_rates.get(meta.dataset, [])] if engine_name == "cpu" else []
        for factor, rate, validation in [(f, f * capacity, False) for f in args.rate_factors] + at_real:
            results = {s.name: run_system(queries, s, rate, settings, args.reps, slo_s) for s in systems}
            ref = results[f"fixed:{best_fixed}"]["per_query"]
            for name, res in results.items():
                diffs = [res["per_query"][q] - ref[q] for q in ref]
                points.append({"dataset": meta.dataset, "engine": engine_name, "rate_factor": factor,
                               "rate_qps": rate, "source": "sim", "at_real_rate": validation,
                               "system": name, "n": res["n"],
                               "quality": res["quality"], "quality_ci95": ci95(diffs),
                               "quality_diff_vs_best_fixed": float(np.mean(diffs)),
                               "mean_s": res["mean_s"], "p95_s": res["p95_s"],
                               "slo_attainment": res["slo_attainment"], "goodput_qps": res["goodput_qps"],
                               "service_est_err": res.get("service_est_median_abs_err"),
                               "service_est_bias": res.get("service_est_bias")})
    return points, info


def read_run(d: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """A `ragserve eval` result dir: its report and its rows by system."""
    report = json.loads((Path(d) / "report.json").read_text())
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in (Path(d) / "rows.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.setdefault(r["system"], []).append(r)
    return report, rows


def real_points(specs: list[str], info: dict[str, Any]) -> list[dict[str, Any]]:
    """Points from `ragserve eval` runs, given as FACTOR=DIR (the rate factor the run used);
    SLO = the simulated dataset's (3x the best fixed plan's unloaded mean latency)."""
    out = []
    for spec in specs:
        factor, _, d = spec.partition("=")
        report, rows = read_run(d)
        meta = report["meta"]
        cpu = info.get(meta["dataset"], {}).get("engines", {}).get("cpu", {})
        slo_s = cpu.get("slo_s")
        run = []   # this run's points: each is paired with the run's own best fixed plan
        for name, rs in rows.items():
            lat = sorted(r["total_s"] for r in rs if r["total_s"] is not None)
            span = max(r["arrival_s"] + (r["total_s"] or 0) for r in rs) - min(r["arrival_s"] for r in rs)
            ok = sum(1 for r in rs if r["total_s"] is not None and slo_s is not None and r["total_s"] <= slo_s)
            run.append({"dataset": meta["dataset"], "engine": "cpu", "rate_factor": float(factor),
                        "rate_qps": meta["rate_qps"], "source": "real", "system": name, "n": len(rs),
                        "quality": float(np.mean([r["quality"] for r in rs])),
                        "per_query": {r["id"]: r["quality"] for r in rs}, "quality_ci95": None,
                        "mean_s": float(np.mean(lat)), "p95_s": percentile(lat, 95),
                        "slo_attainment": ok / len(rs) if slo_s else None,
                        "goodput_qps": ok / span if slo_s and span > 0 else None})
        ref = next((p for p in run if p["system"] == f"fixed:{cpu.get('best_fixed')}"), None)
        if ref is not None:
            for p in run:
                diffs = [p["per_query"][q] - ref["per_query"][q] for q in ref["per_query"] if q in p["per_query"]]
                p["quality_diff_vs_best_fixed"] = float(np.mean(diffs))
                p["quality_ci95"] = ci95(diffs)
        out += run
    for p in out:
        p.pop("per_query", None)
    return out


REPLAY_OVERHEAD = CostConfig().overhead_tokens_per_call   # the template the replay prices; chunks get the rest


def replay_query(row: dict[str, Any], overhead: int) -> SimQuery:
    """A real row as a one-plan SimQuery: its tokens, and chunk sizes that make the cost model's
    prompt for that plan equal the row's (for the scheduler's KV price)."""
    plan = RagPlan.parse(row["plan"])
    calls = max(1, row.get("num_calls") or 1)
    per_call = row["prompt_tokens"] / calls
    chunks_per_call = plan.num_chunks if calls == 1 else 1
    chunk = max(1, round((per_call - overhead) / chunks_per_call) - CostConfig().overhead_tokens_per_chunk)
    return SimQuery(row["id"], (chunk,) * plan.num_chunks, 0,
                    {plan: Outcome(row["quality"], row["prompt_tokens"], row["output_tokens"], calls)})


def replay_points(specs: list[str], args) -> list[dict[str, Any]]:
    """Each real run's own trace through the simulated engine: the same arrivals, each query
    with the plan the run gave it and the prompt and output tokens it got, at the speeds the
    run measured. What is left of the real-vs-sim gap is the engine model's, not the sweep's
    questions or another session's speeds."""
    out = []
    for spec in specs:
        factor, _, d = spec.partition("=")
        report, all_rows = read_run(d)
        meta = report["meta"]
        rows = {name: [r for r in rs if r.get("error") is None and r.get("total_s") is not None]
                for name, rs in all_rows.items()}
        model = ModelSpec(meta["model"], *GEOMETRY[meta["model"]], kv_dtype_bytes(args, meta["dataset"]), 8192)
        engine = meta.get("engine_config") or {}
        kv_tokens = int(float(engine.get("kv_budget_mb", args.kv_budget_mb)) * 2**20 // model.kv_bytes_per_token)
        for name, rs in rows.items():
            speeds = (report["systems"].get(name) or {}).get("engine_speeds")
            if not speeds or not rs:
                continue
            rs = sorted(rs, key=lambda r: r["arrival_s"])
            queries = [replay_query(r, REPLAY_OVERHEAD) for r in rs]
            settings = SimSettings(speeds=EngineSpeeds.from_dict(speeds), kv_capacity_tokens=kv_tokens, model=model,
                                   answer_tokens=int((meta.get("synthesis") or {}).get("answer_tokens", args.answer_tokens)),
                                   overhead_tokens_per_call=REPLAY_OVERHEAD, max_batch=int(engine.get("max_batch_size", 16)))
            # fixed plans went straight to the engine; tuned and metis through the scheduler's
            # admission (KV reserved until the query ends), which is replayed with the one plan
            system = SimSystem(name, replay=True) if name.startswith("fixed:") else SimSystem(name)
            sim = simulate(queries, system, meta["rate_qps"], settings, arrivals=[r["arrival_s"] for r in rs])
            lat = sorted(x.latency_s for x in sim)
            out.append({"dataset": meta["dataset"], "engine": "cpu", "rate_factor": float(factor),
                        "rate_qps": meta["rate_qps"], "source": "replay", "system": name, "n": len(sim),
                        "quality": float(np.mean([x.quality for x in sim])), "quality_ci95": None,
                        "mean_s": float(np.mean(lat)), "p95_s": percentile(lat, 95),
                        "slo_attainment": None, "goodput_qps": None})
    return out


def targets(points: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    """The controller issue's targets, per dataset and engine, from the tuned system's points."""
    out = []
    for ds, dinfo in info.items():
        for engine, einfo in dinfo["engines"].items():
            pts = [p for p in points if p["dataset"] == ds and p["engine"] == engine and p["source"] == "sim"
                   and not p.get("at_real_rate")]

            def at(factor, name):
                return next((p for p in pts if p["rate_factor"] == factor and p["system"] == name), None)
            best = f"fixed:{einfo['best_fixed']}"
            for factor in sorted({p["rate_factor"] for p in pts}):
                tuned, ref = at(factor, "tuned"), at(factor, best)
                if tuned is None or ref is None:
                    continue
                fixed = [p for p in pts if p["rate_factor"] == factor and p["system"].startswith("fixed:")]
                equal = [p for p in fixed if p["quality"] >= tuned["quality"] - EQUAL_QUALITY]
                fastest_equal = min(equal, key=lambda p: p["mean_s"]) if equal else None
                similar = min(fixed, key=lambda p: abs(p["mean_s"] - tuned["mean_s"]))
                out.append({
                    "dataset": ds, "engine": engine, "rate_factor": factor,
                    "tuned_quality": tuned["quality"], "best_fixed": best, "best_fixed_quality": ref["quality"],
                    "quality_ok": tuned["quality"] >= ref["quality"] - EQUAL_QUALITY,
                    "fastest_fixed_at_equal_quality": fastest_equal["system"] if fastest_equal else None,
                    "latency_ratio_vs_it": (tuned["mean_s"] / fastest_equal["mean_s"]) if fastest_equal else None,
                    "similar_latency_fixed": similar["system"],
                    "relative_gain_vs_similar": (tuned["quality"] / similar["quality"] - 1) if similar["quality"] else None,
                    "goodput_ratio_vs_best_fixed": (tuned["goodput_qps"] / ref["goodput_qps"]) if ref["goodput_qps"] else None,
                    "metis_quality": (at(factor, "metis") or {}).get("quality"),
                    "metis_mean_s": (at(factor, "metis") or {}).get("mean_s")})
    return out


def validation(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each real point beside the simulated point at the same dataset, system and rate (the
    sweep's queries, Poisson arrivals) and beside the replay of its own trace."""
    out = []
    for r in (p for p in points if p["source"] == "real"):
        def match(p):
            return p["dataset"] == r["dataset"] and p["system"] == r["system"] and p["rate_factor"] == r["rate_factor"]
        sim = next((p for p in points if p.get("at_real_rate") and match(p)), None)
        replay = next((p for p in points if p["source"] == "replay" and match(p)), None)
        if sim is None:
            continue
        err = sim["mean_s"] / r["mean_s"] - 1
        q_err = (sim["quality"] / r["quality"] - 1) if r["quality"] else 0.0
        out.append({"dataset": r["dataset"], "rate_factor": r["rate_factor"], "system": r["system"],
                    "real_quality": r["quality"], "sim_quality": sim["quality"], "real_mean_s": r["mean_s"],
                    "sim_mean_s": sim["mean_s"], "mean_rel_error": err, "quality_rel_error": q_err,
                    "within_15pct": abs(err) <= 0.15 and abs(q_err) <= 0.15,
                    "replay_mean_s": replay["mean_s"] if replay else None,
                    "replay_mean_rel_error": (replay["mean_s"] / r["mean_s"] - 1) if replay else None})
    return out


def fmt(v, nd=3):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_md(path: Path, doc: dict[str, Any]) -> None:
    lines = ["# Controller sweep", "", doc["note"], "", f"Command: `{doc['command']}`", ""]
    for ds, dinfo in doc["info"].items():
        for engine, e in dinfo["engines"].items():
            lines += [f"## {ds} — {engine} engine (best fixed `{e['best_fixed']}`, capacity {e['capacity_qps']:.3f} q/s, "
                      f"SLO {e['slo_s']:.1f} s, KV {e['kv_capacity_tokens']} tokens)", "",
                      "| rate × | system | n | quality | Δ vs best fixed ± 95% CI | mean s | p95 s | SLO att. | goodput q/s |",
                      "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
            for p in doc["points"]:
                if p["dataset"] == ds and p["engine"] == engine:
                    lines.append(f"| {p['rate_factor']} | `{p['system']}` ({p['source']}) | {p['n']} | {fmt(p['quality'])} | "
                                 f"{fmt(p.get('quality_diff_vs_best_fixed'))} ± {fmt(p['quality_ci95'])} | "
                                 f"{fmt(p['mean_s'], 2)} | {fmt(p['p95_s'], 2)} | {fmt(p['slo_attainment'], 2)} | "
                                 f"{fmt(p['goodput_qps'])} |")
            lines.append("")
    val = validation(doc["points"])
    if val:
        lines += ["## Simulator validation (real runs vs the simulator at the same rate)", "",
                  "sim: the sweep's queries at the run's rate, Poisson arrivals. replay: the run's own trace "
                  "(arrivals, plans, prompt and output tokens) at the speeds it measured, through the "
                  "simulated engine alone.", "",
                  "| dataset | rate × | system | real quality | sim quality | real mean s | sim mean s | "
                  "mean error | within 15% | replay mean s | replay error |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for v in val:
            rerr = "" if v["replay_mean_rel_error"] is None else f"{v['replay_mean_rel_error']:+.0%}"
            lines.append(f"| {v['dataset']} | {v['rate_factor']} | `{v['system']}` | {fmt(v['real_quality'])} | "
                         f"{fmt(v['sim_quality'])} | {fmt(v['real_mean_s'], 2)} | {fmt(v['sim_mean_s'], 2)} | "
                         f"{v['mean_rel_error']:+.0%} | {v['within_15pct']} | {fmt(v['replay_mean_s'], 2)} | {rerr} |")
        lines.append("")
    lines += ["## Targets (tuned)", "",
              "| dataset | engine | rate × | tuned q | best fixed q | quality ok | fastest fixed at equal q | latency ratio | "
              "similar-latency fixed | rel. gain | goodput ratio | metis q | metis mean s |",
              "|---|---|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|"]
    for t in doc["targets"]:
        lines.append(f"| {t['dataset']} | {t['engine']} | {t['rate_factor']} | {fmt(t['tuned_quality'])} | "
                     f"{fmt(t['best_fixed_quality'])} | {t['quality_ok']} | {t['fastest_fixed_at_equal_quality']} | "
                     f"{fmt(t['latency_ratio_vs_it'], 2)} | {t['similar_latency_fixed']} | "
                     f"{fmt(t['relative_gain_vs_similar'])} | {fmt(t['goodput_ratio_vs_best_fixed'], 2)} | "
                     f"{fmt(t['metis_quality'])} | {fmt(t['metis_mean_s'], 2)} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path_prefix: Path, doc: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds in doc["info"]:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name in sorted({p["system"] for p in doc["points"] if p["dataset"] == ds}):
            for source, style in (("sim", "-"), ("real", "o")):
                pts = sorted((p for p in doc["points"] if p["dataset"] == ds and p["system"] == name
                              and p["source"] == source and p["engine"] == "cpu"), key=lambda p: p["rate_factor"])
                if pts:
                    x = [p["rate_factor"] for p in pts]
                    lw = 2.5 if name in ("tuned", "metis") else 1
                    a.plot(x, [p["quality"] for p in pts], style, label=f"{name} ({source})", lw=lw)
                    b.plot(x, [p["mean_s"] for p in pts], style, label=f"{name} ({source})", lw=lw)
        a.set(xlabel="arrival rate / best fixed plan's capacity", ylabel="quality", title=f"{ds}: quality")
        b.set(xlabel="arrival rate / best fixed plan's capacity", ylabel="mean latency s", yscale="log",
              title=f"{ds}: latency")
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}-{ds}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", required=True, help="tuning sweep dirs (one per dataset)")
    ap.add_argument("--out", default="eval/results/controller_sweep")
    ap.add_argument("--real", nargs="*", default=[],
                    help="ragserve eval runs to add as real points, each FACTOR=DIR (the run's rate factor)")
    ap.add_argument("--speeds-from", nargs="*", default=[], metavar="[DATASET=]DIR",
                    help="ragserve eval run dirs: simulate with the engine speeds a run measured instead of speeds "
                         "fitted to the sweep's latencies; DIR for every dataset, DATASET=DIR for one (a run on "
                         "the machine its sweep ran on)")
    ap.add_argument("--kv-budget-mb", type=float, default=64.0)
    ap.add_argument("--dtype-bytes", nargs="*", default=[], metavar="[DATASET=]N",
                    help="KV bytes per value (4 = fp32 CPU, the default; 2 = bf16), for every dataset or DATASET=N")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--overhead-tokens", type=int, default=None,
                    help="per-call template tokens the planner prices (default: fitted to each sweep's stuff prompts)")
    ap.add_argument("--time-value", type=float, default=TunedConfig().time_value)
    ap.add_argument("--slack", type=float, default=TunedConfig().slack)
    ap.add_argument("--reps", type=int, default=5, help="traces per point (shuffled order, new arrivals)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--rate-factors", type=float, nargs="+", default=list(RATE_FACTORS))
    ap.add_argument("--gpu-whatif", action="store_true", help="also simulate a GPU-like engine where KV binds")
    ap.add_argument("--gpu-kv-tokens", type=int, default=6000)
    args = ap.parse_args()
    points, info = [], {}
    args.real_rates = real_rates(args.real)
    for d in args.profiles:
        p, i = dataset_points(Path(d), args)
        points += p
        info[i["dataset"]] = i
    points += real_points(args.real, info)
    points += replay_points(args.real, args)
    doc = {"command": "python " + " ".join(sys.argv), "points": points, "info": info,
           "targets": targets(points, info), "validation": validation(points),
           "note": ("Simulated points: Poisson traces of each sweep's queries (n = queries; quality = mean over "
                    f"{args.reps} traces, CI paired by query vs the best fixed plan) through the real scheduler and "
                    "decision rule; quality per (query, plan) from the sweep records; the tuned rule plans with "
                    f"{args.folds}-fold cross-fitted quality predictions (never trained on the query it plans); engine "
                    "speeds fitted to the sweep's idle latencies. metis here = METIS' best fit over the sweep grid "
                    "(all grid plans as candidates, no profiler).")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_md(Path(f"{out}.md"), doc)
    plot(out, doc)
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
