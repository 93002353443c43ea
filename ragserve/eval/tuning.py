"""Offline tuning (`ragserve tune`): run a grid of plans per query, keep every outcome,
and derive each query's best plan the way METIS defines it.

For a seeded sample of a dataset's questions, every plan of the grid answers every
question, one query at a time (an idle engine: latency is the plan's own delay, not
queueing). Each (query, plan) outcome is one record. The best plan of a query is the
cheapest (lowest latency) plan whose quality is within 2% of the best quality any plan
reached for that query (METIS §3: "the lowest-delay configuration within 2% of the
maximum quality"); "within 2%" is relative: quality >= (1 - 0.02) * max quality. Ties in
latency go to fewer prompt tokens, then to RagPlan order (method name, chunks, intermediate).

Directory format, `profiles/<model>/<dataset>/` (format_version 1; profiles/README.md):

    meta.json      what was run: format_version, model, dataset, engine, grid, quality
                   metric, seed, sample ids, collection, best-plan rule, command, git
                   commit, versions, created/finished times, complete flag
    records.jsonl  one TuneRecord per line, appended as each (query, plan) finishes; a
                   rerun with the same meta skips the pairs already recorded (resume)
    labels.jsonl   derived: the best plan per query (rewritten at the end of a run)
    summary.json / summary.md / plans.png   derived: per-plan means and the per-query
                   best ("oracle") point, quality vs latency
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from ragserve.config import Config
from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, NotFound, RagServeError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BEST_TOLERANCE = 0.02   # METIS: within 2% of the best quality

# Spans METIS' pruned spaces for pieces 1-4: map_rerank/stuff at 1..10 chunks, map_reduce
# with a short and a long summary. Sized for CPU engines.
DEFAULT_TUNE_GRID: tuple[RagPlan, ...] = (
    RagPlan(Method.MAP_RERANK, 1), RagPlan(Method.MAP_RERANK, 3), RagPlan(Method.MAP_RERANK, 6),
    RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 3), RagPlan(Method.STUFF, 6), RagPlan(Method.STUFF, 10),
    RagPlan(Method.MAP_REDUCE, 3, 48), RagPlan(Method.MAP_REDUCE, 6, 96),
)


@dataclass(frozen=True)
class TuneRecord:
    """The outcome of one plan on one query (one line of records.jsonl)."""

    query_id: str
    question: str
    plan: RagPlan
    quality: float               # the dataset's primary metric (0 when the query failed)
    latency_s: float | None      # end-to-end on an idle engine (None when failed)
    f1: float = 0.0
    em: float = 0.0
    rouge_l: float = 0.0
    numeric: float | None = None   # None when the gold holds no number
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    num_calls: int = 0
    answer: str = ""
    error: str | None = None     # set when the query failed; such records never win
    # What retrieval found for the query (ragserve.metis.quality.retrieval_summary): the quality
    # model's retrieval features. None in sweeps recorded before it was kept.
    retrieval: dict[str, list] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.retrieval is None:
            del out["retrieval"]
        out["plan"] = self.plan.to_dict()
        out["plan_str"] = str(self.plan)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TuneRecord":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in known}
        values["plan"] = RagPlan.from_dict(raw["plan"])
        return cls(**values)


@dataclass(frozen=True)
class BestPlan:
    query_id: str
    question: str
    plan: RagPlan
    quality: float          # the chosen plan's quality
    latency_s: float
    max_quality: float      # the best quality any plan reached for the query
    num_candidates: int     # plans within the band

    def to_dict(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "question": self.question, "best_plan": self.plan.to_dict(),
                "best_plan_str": str(self.plan), "quality": round(self.quality, 4),
                "latency_s": round(self.latency_s, 4), "max_quality": round(self.max_quality, 4),
                "num_candidates": self.num_candidates}


def best_plan(records: Sequence[TuneRecord], tolerance: float = BEST_TOLERANCE) -> BestPlan | None:
    """The cheapest plan within `tolerance` (relative) of the best quality of one query's
    records; None when every record failed."""
    ok = [r for r in records if r.error is None]
    if not ok:
        return None
    if len({r.query_id for r in ok}) != 1:
        raise BadInput("best_plan takes the records of one query; group them by query_id first")
    top = max(r.quality for r in ok)
    band = [r for r in ok if r.quality >= (1.0 - tolerance) * top - 1e-12]
    best = min(band, key=lambda r: (r.latency_s, r.prompt_tokens, r.plan))
    return BestPlan(best.query_id, best.question, best.plan, best.quality, best.latency_s, top, len(band))


def best_plans(records: Iterable[TuneRecord], tolerance: float = BEST_TOLERANCE) -> dict[str, BestPlan]:
    """query_id -> best plan, in first-seen query order (queries whose plans all failed are left out)."""
    groups: dict[str, list[TuneRecord]] = defaultdict(list)
    for r in records:
        groups[r.query_id].append(r)
    out = {}
    for qid, recs in groups.items():
        b = best_plan(recs, tolerance)
        if b is not None:
            out[qid] = b
    return out


# ---------------------------------------------------------------------------- files

@dataclass(frozen=True)
class TuneMeta:
    """meta.json of a profile directory."""

    model: str
    dataset: str
    grid: tuple[RagPlan, ...]
    quality_metric: str
    engine: str = "local"
    seed: int | str = 0
    query_ids: tuple[str, ...] = ()
    collection: str = ""
    corpus_limit: int | None = None
    tolerance: float = BEST_TOLERANCE
    command: str = ""
    created: str = ""
    finished: str = ""
    complete: bool = False
    elapsed_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    machine_load: dict[str, Any] = field(default_factory=dict)   # load average, process CPU seconds
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["grid"] = [p.to_dict() for p in self.grid]
        out["grid_str"] = [str(p) for p in self.grid]
        out["query_ids"] = list(self.query_ids)
        out["best_plan_rule"] = {"quality": "within tolerance (relative) of the query's best quality",
                                 "tolerance": self.tolerance, "cost": "latency_s (lowest wins)",
                                 "ties": "fewer prompt_tokens, then RagPlan order (method name, "
                                         "num_chunks, intermediate_tokens)"}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TuneMeta":
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise BadInput(f"profile format_version {version!r} is not supported (this ragserve reads "
                           f"{FORMAT_VERSION}); re-run ragserve tune")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in raw.items() if k in known}
        values["grid"] = tuple(RagPlan.from_dict(p) for p in raw["grid"])
        values["query_ids"] = tuple(raw.get("query_ids", ()))
        return cls(**values)


def read_meta(directory: str | Path) -> TuneMeta:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise NotFound(f"no tuning profile at {str(directory)!r} (missing meta.json); run ragserve tune first")
    return TuneMeta.from_dict(json.loads(path.read_text()))


def read_records(directory: str | Path) -> list[TuneRecord]:
    path = Path(directory) / "records.jsonl"
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(TuneRecord.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            if lineno == len(lines):   # a run killed mid-write
                logger.warning("%s: ignoring a truncated last line", path)
                break
            raise BadInput(f"{str(path)!r} line {lineno} is not a tuning record: {exc}") from None
    return out


def read_profile(directory: str | Path) -> tuple[TuneMeta, list[TuneRecord]]:
    return read_meta(directory), read_records(directory)


def write_meta(directory: str | Path, meta: TuneMeta) -> None:
    from ragserve.eval.report import write_json

    write_json(Path(directory) / "meta.json", meta.to_dict())


def append_record(directory: str | Path, record: TuneRecord) -> None:
    path = Path(directory) / "records.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")
        f.flush()


def write_labels(directory: str | Path, records: Sequence[TuneRecord],
                 tolerance: float = BEST_TOLERANCE) -> dict[str, BestPlan]:
    from ragserve.eval.report import write_jsonl

    best = best_plans(records, tolerance)
    write_jsonl(Path(directory) / "labels.jsonl", (b.to_dict() for b in best.values()))
    return best


# ---------------------------------------------------------------------------- summary

def summarize_profile(meta: TuneMeta, records: Sequence[TuneRecord]) -> dict[str, Any]:
    """Per-plan mean quality/latency, the per-query best ("oracle") and how often each plan wins."""
    from ragserve.eval.report import summarize

    best = best_plans(records, meta.tolerance)
    by_plan: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_plan[f"fixed:{r.plan}"].append(_as_row(r))
    summaries = {name: summarize(rows) for name, rows in by_plan.items()}
    oracle_rows = [_as_row(next(r for r in records if r.query_id == q and r.plan == b.plan)) for q, b in best.items()]
    if oracle_rows:
        summaries["per-query best"] = summarize(oracle_rows)
    wins: dict[str, int] = defaultdict(int)
    for b in best.values():
        wins[str(b.plan)] += 1
    return {"model": meta.model, "dataset": meta.dataset, "num_queries": len({r.query_id for r in records}),
            "num_records": len(records), "tolerance": meta.tolerance, "plans": summaries,
            "best_plan_counts": dict(sorted(wins.items(), key=lambda kv: -kv[1]))}


def _as_row(r: TuneRecord) -> dict[str, Any]:
    return {"id": r.query_id, "plan": str(r.plan), "method": r.plan.method.value, "quality": r.quality,
            "f1": r.f1, "em": r.em, "rouge_l": r.rouge_l, "numeric": r.numeric,
            "total_s": None if r.error else r.latency_s, "ttft_s": None if r.error else r.ttft_s,
            "queue_s": 0.0, "profile_s": 0.0, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "arrival_s": 0.0, "finish_s": r.latency_s or 0.0,
            "error": r.error}


def write_summary(directory: str | Path, meta: TuneMeta, records: Sequence[TuneRecord]) -> dict[str, Any]:
    from ragserve.eval.report import METRIC_LABELS, fmt_num, plot_quality_latency, write_json

    directory = Path(directory)
    summary = summarize_profile(meta, records)
    write_json(directory / "summary.json", summary)
    lines = [f"# tuning profile: {meta.dataset} / {meta.model}", "",
             f"- command: `{meta.command}`", f"- {summary['num_queries']} queries x {len(meta.grid)} plans, "
             f"best plan = lowest latency within {meta.tolerance:.0%} of the query's best quality", "",
             "| plan | quality | F1 | mean latency s | prompt tokens | best for queries |", "|---|---|---|---|---|---|"]
    for name, s in summary["plans"].items():
        plan = name[len("fixed:"):] if name.startswith("fixed:") else name
        lines.append(f"| `{plan}` | {fmt_num(s['quality'])} | {fmt_num(s['f1'])} | {fmt_num(s['total_s']['mean'], 2)} | "
                     f"{fmt_num(s.get('prompt_tokens_mean'), 0)} | {summary['best_plan_counts'].get(plan, '')} |")
    (directory / "summary.md").write_text("\n".join(lines) + "\n")
    if summary["plans"]:
        plot_quality_latency(directory / "plans.png", {k: v for k, v in summary["plans"].items()
                                                         if k != "per-query best"},
                             "quality", f"tuning {meta.dataset} / {meta.model}: plans and the per-query best",
                             extra_points={"per-query best": (summary["plans"]["per-query best"]["total_s"]["mean"],
                                                              summary["plans"]["per-query best"]["quality"])}
                             if "per-query best" in summary["plans"] else None,
                             metric_label=METRIC_LABELS.get(meta.quality_metric, meta.quality_metric))
    return summary


# ---------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class TuneSettings:
    dataset: str
    num: int
    out: Path
    grid: tuple[RagPlan, ...] = DEFAULT_TUNE_GRID
    seed: int | str = 0
    corpus_limit: int | None = None
    doc_filter: bool = False
    datasets_root: str | None = None
    progress: bool = True
    command: str = ""
    holdout: int = 0
    """Never tune on the questions `ragserve eval --num HOLDOUT --seed SEED` samples, so a
    profiler trained here is evaluated on that very sample (and its saved fixed runs)."""
    ray: str | None = None
    """Run the (query, plan) cells on a Ray cluster (eval/ray_sweep.py): "auto", an address
    (HOST:PORT or ray://HOST:PORT), or "local" (a private cluster on 127.0.0.1). None = in process."""
    concurrency: int = 1
    """(query, plan) cells in flight at once on the in-process engine. 1 keeps each record's
    latency its plan's own on an idle engine; more batches their decoding (a fraction of the
    wall time) and records latencies under that load: the engine's measured speeds, saved in
    meta.json, then describe the plans' service instead (the simulator reads them)."""
    ray_workers: int | None = None
    """Ray workers, each with its own engine; None = one per CPU of the cluster."""


def _compatible(old: TuneMeta, new: TuneMeta) -> bool:
    return (old.model, old.dataset, old.collection, old.quality_metric) == \
           (new.model, new.dataset, new.collection, new.quality_metric)


def tune_questions(rows: Sequence[dict[str, Any]], num: int, seed: int | str, holdout: int = 0
                   ) -> list[dict[str, Any]]:
    """The tuned sample: seeded as "tune:<seed>" (not the sample `ragserve eval --seed <seed>`
    draws), and none of the questions `ragserve eval --num <holdout> --seed <seed>` samples."""
    from ragserve.eval.workload import sample_questions

    held = {r["id"] for r in sample_questions(rows, holdout, seed)} if holdout > 0 else set()
    return sample_questions([r for r in rows if r["id"] not in held], num, f"tune:{seed}")


def run_tune(settings: TuneSettings, config: Config) -> dict[str, Any]:
    """The grid sweep; appends to `settings.out`/records.jsonl and resumes a compatible run."""
    from ragserve.eval.datasets import (apply_dataset_settings, ensure_collection, get_spec, load_questions)
    from ragserve.eval.report import environment, process_cpu_s

    spec = get_spec(settings.dataset)
    questions = tune_questions(load_questions(settings.dataset, settings.datasets_root), settings.num,
                               settings.seed, settings.holdout)
    corpus = ensure_collection(settings.dataset, config, questions, settings.corpus_limit,
                               settings.datasets_root, progress=settings.progress)
    config = apply_dataset_settings(config, spec, corpus.collection)
    out = Path(settings.out)
    meta = TuneMeta(model=config.engine.model, dataset=settings.dataset, grid=tuple(settings.grid),
                    quality_metric=spec.quality_metric, engine=config.engine.backend, seed=settings.seed,
                    query_ids=tuple(q["id"] for q in questions), collection=corpus.collection,
                    corpus_limit=settings.corpus_limit, command=settings.command,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), environment=environment())
    done: set[tuple[str, str]] = set()
    if (out / "meta.json").is_file():
        old = read_meta(out)
        if not _compatible(old, meta):
            raise BadInput(f"{str(out)!r} holds a profile of {old.model}/{old.dataset} on collection "
                           f"{old.collection!r}; use another --out or delete it")
        done = {(r.query_id, str(r.plan)) for r in read_records(out)}
        grid = tuple(dict.fromkeys(old.grid + meta.grid))
        ids = tuple(dict.fromkeys(old.query_ids + meta.query_ids))
        meta = replace(meta, grid=grid, query_ids=ids, created=old.created, elapsed_s=old.elapsed_s)
    write_meta(out, meta)
    t0, cpu0, load0 = time.perf_counter(), process_cpu_s(), os.getloadavg()
    if settings.ray:
        from ragserve.eval.ray_sweep import ray_sweep

        sweep = ray_sweep(settings, config, spec, questions, corpus.collection, done)
    else:
        sweep = asyncio.run(_sweep(settings, config, spec, questions, corpus.collection, done))
    records = read_records(out)
    load = {"loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - t0, 1), "process_cpu_s": round(process_cpu_s() - cpu0, 1),
            "sweep": sweep}
    meta = replace(meta, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=True, machine_load=load,
                   elapsed_s=round(meta.elapsed_s + time.perf_counter() - t0, 1))
    write_meta(out, meta)
    write_labels(out, records, meta.tolerance)
    return write_summary(out, meta, records)


@dataclass(frozen=True)
class SweepStats:
    """How a sweep ran (meta.json machine_load.sweep): its throughput, apart from start-up."""

    num_cells: int
    num_workers: int          # Ray workers; 0 = in process
    startup_s: float          # engines loaded and warmed up (and the Ray cluster started)
    cells_s: float            # from the first cell to the last record

    def to_dict(self) -> dict[str, Any]:
        return {"num_cells": self.num_cells, "num_workers": self.num_workers, "startup_s": round(self.startup_s, 2),
                "cells_s": round(self.cells_s, 2),
                "cells_per_s": round(self.num_cells / self.cells_s, 4) if self.cells_s > 0 else None}


def sweep_cells(settings: TuneSettings, questions: Sequence[dict[str, Any]],
                done: set[tuple[str, str]]) -> list[tuple[dict[str, Any], RagPlan]]:
    """The (query, plan) cells still to run, in sweep order."""
    return [(q, p) for q in questions for p in settings.grid if (q["id"], str(p)) not in done]


async def warm_up(controller: Any, spec: Any, question: dict[str, Any], collection: str, doc_filter: bool) -> None:
    """One untimed query: the first call pays one-off costs."""
    from ragserve.eval.datasets import query_filters

    await controller.query(question["question"], collection, plan=RagPlan(Method.STUFF, 1),
                           filters=query_filters(spec, question, doc_filter))


async def run_cell(controller: Any, spec: Any, q: dict[str, Any], plan: RagPlan, collection: str,
                   doc_filter: bool) -> TuneRecord:
    """One plan on one query, on an otherwise idle controller; a failure becomes an error record."""
    from ragserve.eval.datasets import query_filters, score

    try:
        r = await controller.query(q["question"], collection, plan=plan,
                                   filters=query_filters(spec, q, doc_filter))
    except (RagServeError, ValueError, RuntimeError) as exc:
        logger.warning("tune: %s with %s failed: %s", q["id"], plan, exc)
        return TuneRecord(q["id"], q["question"], plan, 0.0, None, error=f"{type(exc).__name__}: {exc}")
    m = score(spec, r.answer, q["answers"])
    return TuneRecord(q["id"], q["question"], plan, m["quality"], r.timings.total_s,
                      f1=m["f1"], em=m["em"], rouge_l=m["rouge_l"], numeric=m["numeric"],
                      ttft_s=r.timings.ttft_s, prompt_tokens=r.prompt_tokens,
                      output_tokens=r.output_tokens, num_calls=r.num_calls, answer=r.answer)


async def _sweep(settings: TuneSettings, config: Config, spec: Any, questions: Sequence[dict[str, Any]],
                 collection: str, done: set[tuple[str, str]]) -> dict[str, Any]:
    """Runs the cells in process; returns SweepStats.to_dict()."""
    from tqdm import tqdm

    from ragserve.controller import Controller
    from ragserve.runtime import build_runtime

    todo = sweep_cells(settings, questions, done)
    if not todo:
        return SweepStats(0, 0, 0.0, 0.0).to_dict()
    t0 = time.perf_counter()
    rt = build_runtime(config, metis=False)
    controller = Controller(rt.engine, rt.retriever, config)
    try:
        await warm_up(controller, spec, todo[0][0], collection, settings.doc_filter)
        t1 = time.perf_counter()
        gate = asyncio.Semaphore(max(1, settings.concurrency))
        bar = tqdm(total=len(todo), desc=f"tune {settings.dataset}", unit="run", disable=not settings.progress)

        async def cell(q: dict[str, Any], plan: RagPlan) -> None:
            async with gate:
                append_record(settings.out, await run_cell(controller, spec, q, plan, collection,
                                                           settings.doc_filter))
                bar.update()
        await asyncio.gather(*(cell(q, p) for q, p in todo))
        bar.close()
        stats = SweepStats(len(todo), 0, t1 - t0, time.perf_counter() - t1).to_dict()
        speeds = rt.engine.stats().speeds
        return {**stats, "concurrency": settings.concurrency,
                **({"engine_speeds": speeds.to_dict()} if speeds is not None else {})}
    finally:
        await rt.close()
