"""`ragserve eval`: replay one Poisson workload against each system and record every query.

Flow: sample the workload (seeded) -> ingest the dataset's collection once -> for each
engine variant (plain; blend for metis+blend) build the runtime without a planner ->
optionally measure the rate (`rate="auto"`) -> per system: a Controller with that
system's planner, each query launched at its arrival time (`run_system`), one row per
query -> report (ragserve.eval.report).

Rows are plain dicts (they are written as JSON lines): id, system, plan, answer, the
quality metrics, total_s (launch -> answer, so it includes scheduler and engine queueing),
ttft_s, queue_s, profile_s, retrieve_s, tokens, decision reason and profile, error.
A query that fails keeps its row with `error` set and quality 0.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ragserve.config import Config
from ragserve.domain import Method, QueryResult, RagPlan
from ragserve.errors import BadInput, RagServeError
from ragserve.eval import checkpoint
from ragserve.eval.datasets import (DatasetSpec, apply_dataset_settings, ensure_collection, get_spec,
                                    load_questions, query_filters, score)
from ragserve.eval.systems import (System, make_planner, system_config, unavailable_reason)
from ragserve.eval.workload import Workload, make_workload
from ragserve.metis.planner import MetisPlanner
from ragserve.metis.rules import PlannerRules

logger = logging.getLogger(__name__)

CALIBRATION_PLAN = RagPlan(Method.STUFF, 4)   # the runtime's default plan
AUTO_LOAD_FACTOR = 1.5    # rate=auto: arrivals at 1.5x what the engine serves one at a time
CALIBRATION_QUERIES = 3   # rate=auto: timed one at a time with CALIBRATION_PLAN
# Blending systems: the chunks precomputed per question, untimed. The tuning grids' largest plan;
# a plan over more chunks computes the rest at query time, timed (blend counters show how many).
PRECOMPUTE_K = 6


@dataclass(frozen=True)
class EvalSettings:
    """One `ragserve eval` invocation."""

    dataset: str
    systems: tuple[System, ...]
    num: int
    rate: float | str              # queries/s, inf (burst), or "auto"
    out: Path
    seed: int = 0
    corpus_limit: int | None = None    # smoke runs: gold passages + this many others
    doc_filter: bool = False           # financebench: restrict retrieval to the question's filing
    datasets_root: str | None = None   # default: RAGSERVE_DATASETS / ../shared/datasets
    warmup: int = 1                    # untimed queries before the first system (model warm-up)
    progress: bool = True
    command: str = ""                  # the exact command line, for the report
    grid: tuple[RagPlan, ...] = ()     # the fixed grid the `fixed` systems came from (report only)
    resume: bool = True                # reuse systems already finished under `out` (eval/checkpoint.py)
    quality: tuple[str, ...] = ()      # sweep dirs the tuned system's quality model is cross-fitted on
    question_ids: tuple[str, ...] = () # exactly these questions (e.g. a sweep's, to validate the simulator)
    rate_factor: float = AUTO_LOAD_FACTOR       # rate auto: this x the one-at-a-time rate of calibration_plan
    calibration_plan: RagPlan = CALIBRATION_PLAN   # rate auto: e.g. the best fixed plan of a sweep


@dataclass
class SystemRun:
    system: System
    rows: list[dict[str, Any]]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. the scheduler's counters


def result_row(system: System, spec: DatasetSpec, question: dict[str, Any], arrival_s: float,
               start_s: float, finish_s: float, result: QueryResult | None,
               error: BaseException | None = None) -> dict[str, Any]:
    """One query's row (the module docstring lists the fields)."""
    row: dict[str, Any] = {"id": question["id"], "system": system.name, "kind": system.kind,
                           "arrival_s": round(arrival_s, 4), "start_s": round(start_s, 4),
                           "finish_s": round(finish_s, 4)}
    if result is None:
        metrics = {"f1": 0.0, "em": 0.0, "rouge_l": 0.0, "numeric": None, "quality": 0.0}
        return {**row, "plan": None, "answer": "", **metrics, "error": f"{type(error).__name__}: {error}"}
    t = result.timings
    d = result.decision
    profiled = d.profile is not None
    return {**row, "plan": str(result.plan), "method": result.plan.method.value,
            "num_chunks": result.plan.num_chunks, "intermediate_tokens": result.plan.intermediate_tokens,
            "answer": result.answer, **score(spec, result.answer, question["answers"]),
            "total_s": round(t.total_s, 4), "ttft_s": round(t.ttft_s, 4), "queue_s": round(t.queue_s, 4),
            "profile_s": round(t.profile_s, 4), "retrieve_s": round(t.retrieve_s, 4),
            "prompt_tokens": result.prompt_tokens, "output_tokens": result.output_tokens,
            "num_calls": result.num_calls, "reason": d.reason, "profile": d.profile.to_dict() if profiled else None,
            "from_history": d.from_history, "kv_free_tokens": d.kv_free_tokens,
            # where the wait went (scheduler admission vs the engine's queue) and the planner's
            # own estimate of the plan's service time, against what it took
            "admission_s": d.admission_s,
            "engine_queue_s": None if d.admission_s is None else round(t.queue_s - d.admission_s, 4),
            "est_service_s": round(d.cost.est_latency_s, 4) if d.cost is not None else None,
            "service_s": round(max(0.0, t.total_s - t.queue_s - t.profile_s - t.retrieve_s), 4),
            "error": None}


async def run_system(controller: Any, system: System, workload: Workload, collection: str,
                     spec: DatasetSpec, doc_filter: bool = False, progress: bool = True) -> SystemRun:
    """Launch each query at its arrival time (relative to now); wait for all of them."""
    from tqdm import tqdm

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    bar = tqdm(total=len(workload.items), desc=system.name, unit="q", disable=not progress, leave=True)

    async def one(item) -> dict[str, Any]:
        delay = t0 + item.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        start = loop.time() - t0
        q = item.question
        result, error = None, None
        try:
            result = await controller.query(q["question"], collection, plan=system.plan,
                                            filters=query_filters(spec, q, doc_filter))
        except (RagServeError, ValueError, RuntimeError) as exc:   # keep the run going; the row says why
            error = exc
            logger.warning("%s: query %s failed: %s", system.name, q["id"], exc)
        finish = loop.time() - t0
        bar.update(1)
        return result_row(system, spec, q, item.arrival_s, start, finish, result, error)

    try:
        rows = await asyncio.gather(*(one(item) for item in workload.items))
    finally:
        bar.close()
    return SystemRun(system, list(rows), loop.time() - t0)


async def calibrate_rate(controller: Any, questions: Sequence[dict[str, Any]], collection: str,
                         spec: DatasetSpec, doc_filter: bool, plan: RagPlan = CALIBRATION_PLAN,
                         factor: float = AUTO_LOAD_FACTOR) -> tuple[float, float]:
    """(rate, mean service time): `factor` / the mean latency of `plan` over `questions`,
    answered one at a time."""
    times = []
    for q in questions:
        r = await controller.query(q["question"], collection, plan=plan,
                                   filters=query_filters(spec, q, doc_filter))
        times.append(r.timings.total_s)
    service_s = sum(times) / len(times)
    # Rounded here, once: the rate the arrivals use is the one calibration.json records, so a
    # resumed run keys its saved systems on the same rate as the run that saved them.
    return round(factor / service_s, 4), service_s


def _variants(systems: Sequence[System]) -> dict[bool, list[System]]:
    """Systems grouped by engine variant (blend or not); each variant gets its own engine."""
    groups: dict[bool, list[System]] = defaultdict(list)
    for s in systems:
        groups[s.blend].append(s)
    return dict(sorted(groups.items()))   # plain engine first


def _load_learned(config: Config, embedder: Any) -> Any:
    if not config.metis.learned_profiler:
        return None
    from ragserve.metis.learned import load_profiler

    return load_profiler(config.metis.learned_profiler, embedder=embedder)


@dataclass(frozen=True)
class _Keys:
    """Checkpoint keys of one run: `plain` for what never profiles (fixed plans, calibration)."""
    profiled: str
    plain: str

    def of(self, system: System) -> str:
        return self.plain if system.kind == "fixed" else self.profiled


def _saved_run(settings: EvalSettings, keys: _Keys, workload: Workload, system: System) -> SystemRun | None:
    if not settings.resume:
        return None
    saved = checkpoint.load_system(settings.out, _system_key(keys.of(system), workload), system.name)
    if saved is None:
        return None
    logger.info("system %s: resumed from %s (%d rows)", system.name, settings.out / checkpoint.DIR, len(saved["rows"]))
    return SystemRun(system, saved["rows"], saved["wall_s"], {**saved["extra"], "resumed": True})


def _system_key(base_key: str, workload: Workload) -> str:
    return checkpoint.workload_key({"base": base_key, "rate_qps": workload.rate_qps})


async def _run_all(settings: EvalSettings, config: Config, spec: DatasetSpec, workload: Workload,
                   collection: str, keys: _Keys) -> tuple[list[SystemRun], dict[str, str], dict[str, Any]]:
    from ragserve.controller import Controller
    from ragserve.runtime import build_runtime

    runs: list[SystemRun] = []
    unavailable: dict[str, str] = {}
    info: dict[str, Any] = {}
    first_engine = True
    calibrated = checkpoint.load_calibration(settings.out, keys.plain) \
        if settings.resume and settings.rate == "auto" else None
    if calibrated is not None:   # replay the arrivals the interrupted run measured
        info.update(calibrated)
        workload = workload.with_rate(calibrated["rate_qps"])
        first_engine = False
    for blend, systems in _variants(settings.systems).items():
        runnable = []
        for s in systems:
            reason = unavailable_reason(s, config)
            if reason:
                unavailable[s.name] = reason
                logger.warning("system %s %s", s.name, reason)
            else:
                runnable.append(s)
        # Saved runs are keyed by the rate: with rate auto they count only once it is calibrated.
        rate_known = settings.rate != "auto" or not first_engine
        saved = {s.name: run for s in runnable
                 if rate_known and (run := _saved_run(settings, keys, workload, s)) is not None}
        if len(saved) == len(runnable):   # all finished earlier: no engine needed
            runs += [saved[s.name] for s in runnable]
            continue
        cfg = system_config(runnable[0], config)
        try:
            rt = build_runtime(cfg, metis=False)
        except Exception as exc:   # e.g. a model blending does not support: the other systems still run
            logger.exception("could not build the %s engine", "blend" if blend else "plain")
            unavailable.update({s.name: f"unavailable: engine failed to start: {type(exc).__name__}: {exc}"
                                for s in runnable})
            continue
        try:
            learned = _load_learned(cfg, rt.retriever.embedder)
            quality = None
            if settings.quality and any(s.tuned for s in runnable):
                from ragserve.eval.quality_training import CrossFitModel

                quality = {collection: CrossFitModel(settings.quality, datasets_root=settings.datasets_root)}
            plain = Controller(rt.engine, rt.retriever, cfg, default_plan=CALIBRATION_PLAN)
            for item in workload.items[: max(0, settings.warmup)]:   # untimed: one-off costs
                q = item.question
                await plain.query(q["question"], collection, plan=CALIBRATION_PLAN,
                                  filters=query_filters(spec, q, settings.doc_filter))
            if first_engine and settings.rate == "auto":
                sample = [i.question for i in workload.items[:CALIBRATION_QUERIES]]
                rate, service_s = await calibrate_rate(plain, sample, collection, spec, settings.doc_filter,
                                                       settings.calibration_plan, settings.rate_factor)
                info.update(rate_qps=rate, calibration_service_s=round(service_s, 3),
                            calibration_plan=str(settings.calibration_plan), rate_factor=settings.rate_factor)
                checkpoint.save_calibration(settings.out, keys.plain, info)
                workload = workload.with_rate(rate)
            first_engine = False
            # The embedded engine's chunk KV, stored once for all of this engine's blending systems
            # (an engine that does not blend, e.g. vLLM with LMCache, keeps its own store).
            precomputed = None
            if blend and getattr(rt.engine, "blender", None) is not None:
                precomputed = await asyncio.to_thread(precompute_workload_kv, rt, collection, workload, spec,
                                                      settings.doc_filter)
            for system in runnable:
                if system.name in saved:
                    runs.append(saved[system.name])
                    continue
                planner = make_planner(system, rt.engine, cfg, learned, quality)
                controller = Controller(rt.engine, rt.retriever, cfg, planner=planner)
                counters_before = dict(getattr(rt.engine, "blend_counters", {}))   # the engine's are cumulative
                try:
                    run = await run_system(controller, system, workload, collection, spec,
                                           settings.doc_filter, settings.progress)
                finally:
                    if planner is not None:
                        await planner.close()
                if isinstance(planner, MetisPlanner):
                    p = planner.stats()
                    run.extra["scheduler"] = {"plans": p.plans, "reasons": p.reasons}
                speeds = rt.engine.stats().speeds
                if speeds is not None:   # this machine's measured speed, for the simulator
                    run.extra["engine_speeds"] = speeds.to_dict()
                if blend and hasattr(rt.engine, "blend_counters"):
                    run.extra["blend"] = {k: v - counters_before.get(k, 0) for k, v in rt.engine.blend_counters.items()}
                    run.extra["blend_precompute"] = precomputed
                checkpoint.save_system(settings.out, _system_key(keys.of(system), workload), system.name, run.rows,
                                       run.wall_s, run.extra)
                runs.append(run)
        finally:
            await rt.close()
    info.setdefault("workload", workload.to_dict())
    return runs, unavailable, info


def precompute_workload_kv(rt: Any, collection: str, workload: Workload, spec: DatasetSpec,
                           doc_filter: bool) -> dict[str, Any]:
    """Store, untimed, the KV of the top-PRECOMPUTE_K chunks of every workload question, as
    `ragserve ingest --precompute-kv` stores a served collection's: a blending system is then
    timed on reuse, not on first prefills a served collection would not pay."""
    t0 = time.perf_counter()
    col = rt.retriever.collection(collection)
    k = min(PRECOMPUTE_K, len(col))
    chunks: dict[str, Any] = {}
    for item in workload.items:
        q = item.question
        hits, _ = rt.retriever.retrieve(col, q["question"], k, query_filters(spec, q, doc_filter))
        chunks.update((h.chunk.id, h.chunk) for h in hits)
    stats = rt.engine.precompute_kv(list(chunks.values()))
    out = {"chunks": len(chunks), "k": k, "computed": stats.num_computed,
           "found": stats.num_ram + stats.num_disk, "wall_s": round(time.perf_counter() - t0, 1)}
    logger.info("blend: chunk KV of %d retrievable chunks (k=%d): %d computed, %d found stored (%.0f s)",
                out["chunks"], k, out["computed"], out["found"], out["wall_s"])
    return out


def build_workload(settings: EvalSettings, exclude_ids: set[str] = frozenset()) -> Workload:
    """The seeded sample; any of `exclude_ids` (a learned profiler's training queries) it draws
    is replaced by a further seeded draw (`sample_questions`)."""
    rows = load_questions(settings.dataset, settings.datasets_root)
    if settings.question_ids:
        by_id = {r["id"]: r for r in rows}
        unknown = [i for i in settings.question_ids if i not in by_id]
        if unknown:
            raise BadInput(f"{len(unknown)} question id(s) are not in {settings.dataset}, e.g. {unknown[0]!r}")
        rows = [by_id[i] for i in settings.question_ids]
    left = sum(1 for r in rows if r["id"] not in exclude_ids)
    if left < settings.num:
        logger.warning("%s: only %d questions left after excluding %d training queries (asked for %d)",
                       settings.dataset, left, len(rows) - left, settings.num)
    rate = 1.0 if settings.rate == "auto" else float(settings.rate)   # auto: re-timed after calibration
    return make_workload(settings.dataset, rows, settings.num, rate, settings.seed, exclude_ids)


def run_eval(settings: EvalSettings, config: Config) -> dict[str, Any]:
    """Run every system of `settings` and write the report; returns the report dict."""
    from ragserve.eval.report import environment, process_cpu_s, write_eval_report

    spec = get_spec(settings.dataset)
    excluded: set[str] = set()
    if config.metis.learned_profiler:   # never evaluate the learned profiler on its training queries
        from ragserve.eval.training import training_query_ids
        excluded = training_query_ids(config.metis.learned_profiler)
    workload = build_workload(settings, excluded)
    load_start, cpu_start, wall_start = os.getloadavg(), process_cpu_s(), time.perf_counter()
    started = environment()   # the code the systems ran, not what the tree holds when they finish
    t0 = time.perf_counter()
    corpus = ensure_collection(settings.dataset, config, [i.question for i in workload.items],
                               settings.corpus_limit, settings.datasets_root, progress=settings.progress)
    ingest_s = time.perf_counter() - t0
    config = apply_dataset_settings(config, spec, corpus.collection)
    def key(cfg: Config, quality: tuple[str, ...] = ()) -> str:
        extra = {"quality": list(quality)} if quality else {}   # keys saved before it stay valid
        if settings.rate_factor != AUTO_LOAD_FACTOR or settings.calibration_plan != CALIBRATION_PLAN:
            extra.update(rate_factor=settings.rate_factor, calibration_plan=str(settings.calibration_plan))
        return checkpoint.workload_key({
            **extra, "dataset": settings.dataset, "config": repr(cfg), "rate": settings.rate, "seed": settings.seed,
            "corpus_limit": settings.corpus_limit, "doc_filter": settings.doc_filter,
            "queries": [(i.question["id"], i.arrival_s) for i in workload.items]})

    # Fixed plans and the calibration never profile: their key leaves the learned profiler out,
    # so a run that adds one reuses the fixed systems saved by the same workload without it.
    keys = _Keys(profiled=key(config, settings.quality),
                 plain=key(replace(config, metis=replace(config.metis, learned_profiler=None))))
    runs, unavailable, info = asyncio.run(_run_all(settings, config, spec, workload, corpus.collection, keys))
    meta = {
        "dataset": settings.dataset, "model": config.engine.model, "engine": config.engine.backend,
        "num": len(workload.items), "rate_qps": info.get("rate_qps", workload.rate_qps),
        "rate_arg": settings.rate, "seed": settings.seed, "collection": corpus.collection,
        "corpus": {"passages": corpus.num_passages, "chunks": corpus.num_chunks, "subset": corpus.subset,
                   "corpus_limit": settings.corpus_limit, "ingested_now": corpus.num_ingested,
                   "ingest_s": round(ingest_s, 2)},
        "doc_filter": settings.doc_filter, "quality_metric": spec.quality_metric,
        "excluded_training_queries": len(excluded),
        "fixed_grid": [str(p) for p in settings.grid],
        "synthesis": {"answer_tokens": config.synthesis.answer_tokens,
                      "answer_stop": list(config.synthesis.answer_stop)},
        "metis": {"feedback_every": config.metis.feedback_every, "policy": config.metis.policy,
                  "learned_profiler": config.metis.learned_profiler,
                  "confidence_threshold": PlannerRules.from_config(config.metis).confidence_threshold},
        "engine_config": {"kv_budget_mb": config.engine.kv_budget_mb,
                          "max_batch_size": config.engine.max_batch_size},
        "command": settings.command, **{k: v for k, v in info.items() if k != "workload"},
        # how busy the machine was: latencies scale with the CPU share this process got
        "machine_load": {"loadavg_start": [round(x, 2) for x in load_start],
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                         "wall_s": round(time.perf_counter() - wall_start, 1),
                         "process_cpu_s": round(process_cpu_s() - cpu_start, 1)},
        "workload": info.get("workload"),
        **started,
    }
    return write_eval_report(settings.out, meta, runs, unavailable)


def rate_arg(text: str) -> float | str:
    """--rate: a number of queries/s, `inf` (burst) or `auto`."""
    if text == "auto":
        return text
    value = float(text)
    if not value > 0 or math.isnan(value):
        raise ValueError(f"rate {text!r} must be > 0, inf or auto")
    return value
