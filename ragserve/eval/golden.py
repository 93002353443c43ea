"""Tuning a user's own collection without gold answers (`ragserve tune --collection C --questions F`).

A user has questions but no gold answers. Each question is answered with the golden plan
(METIS §5: the most expensive plan that fits: the grid's largest KV budget within the
engine's limits) and with every plan of the grid; a plan's label is its answer's agreement
with the golden answer (SQuAD-normalized token F1). The records keep the profile format of
`ragserve tune` (quality = agreement), with each query's retrieval summary, so the same
quality model trains on them and lands in `<collection dir>/quality/`, where the tuned
controller finds it.

`agreement_vs_gold` says how far that proxy can be trusted: on sweeps that have gold, the
rank correlation per query between agreement-with-golden and gold quality.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragserve.config import Config
from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput
from ragserve.metrics import token_f1

logger = logging.getLogger(__name__)

# Cheap to rich: the plans the tuned controller chooses among on a user's collection; the
# richest that fits answers as the golden plan.
GOLDEN_GRID: tuple[RagPlan, ...] = (
    RagPlan(Method.STUFF, 1), RagPlan(Method.STUFF, 2), RagPlan(Method.STUFF, 3), RagPlan(Method.STUFF, 6),
    RagPlan(Method.MAP_RERANK, 3), RagPlan(Method.MAP_REDUCE, 4, 48),
)


def read_questions(path: str | Path) -> list[dict[str, str]]:
    """One question per line (plain text), or JSONL with a "question" field (and optional "id")."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"questions file {str(p)!r} does not exist")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                raise BadInput(f"{str(p)!r} line {i} starts like JSON but does not parse") from None
            if not isinstance(row.get("question"), str) or not row["question"].strip():
                raise BadInput(f"{str(p)!r} line {i} has no \"question\" text")
            out.append({"id": str(row.get("id") or f"q{i}"), "question": row["question"].strip()})
        else:
            out.append({"id": f"q{i}", "question": line})
    if not out:
        raise BadInput(f"questions file {str(p)!r} holds no questions")
    return out


def golden_plan(grid: Sequence[RagPlan], cost: Any, counts: Sequence[int], question_tokens: int,
                limit_tokens: int) -> RagPlan:
    """The grid's most expensive plan (largest KV budget) whose calls fit `limit_tokens`."""
    usable = [p for p in grid if p.num_chunks <= len(counts)]
    priced = [(cost.estimate(p, counts, question_tokens), p) for p in usable]
    fits = [(c, p) for c, p in priced if c.max_call_tokens <= limit_tokens and c.kv_tokens <= limit_tokens]
    if not fits:
        raise BadInput(f"no plan of the grid {[str(p) for p in grid]} fits the engine limit of {limit_tokens} "
                       "tokens for this question; use a smaller grid")
    return max(fits, key=lambda cp: (cp[0].kv_budget_tokens, cp[1]))[1]


def agreement(answer: str, golden: str) -> float:
    return token_f1(answer, golden)


def agreement_vs_gold(profile_dir: str | Path) -> dict[str, Any]:
    """On a sweep with gold answers: per query, Spearman correlation between each plan's
    agreement with the golden plan's answer and its gold quality; the golden plan is the
    grid's largest by prompt tokens (its records' own)."""
    from scipy.stats import spearmanr

    from ragserve.eval.tuning import read_profile

    meta, records = read_profile(profile_dir)
    by_query: dict[str, list[Any]] = {}
    for r in records:
        if r.error is None:
            by_query.setdefault(r.query_id, []).append(r)
    rhos, pooled_a, pooled_q = [], [], []
    for recs in by_query.values():
        if len(recs) < 3:
            continue
        gold_rec = max(recs, key=lambda r: (r.prompt_tokens, r.plan))
        others = [r for r in recs if r is not gold_rec]
        a = [agreement(r.answer, gold_rec.answer) for r in others]
        q = [r.quality for r in others]
        pooled_a += a
        pooled_q += q
        if np.ptp(a) > 0 and np.ptp(q) > 0:
            rhos.append(spearmanr(a, q).statistic)
    pooled = spearmanr(pooled_a, pooled_q).statistic if len(pooled_a) > 2 else None
    return {"dataset": meta.dataset, "model": meta.model, "num_queries": len(by_query),
            "per_query_rank_correlation_mean": float(np.mean(rhos)) if rhos else None,
            "num_queries_with_spread": len(rhos),
            "pooled_rank_correlation": None if pooled is None else float(pooled)}


def run_collection_tune(collection: str, questions_file: str | Path, grid: Sequence[RagPlan], out: str | Path,
                        model_dir: str | Path | None, config: Config, concurrency: int = 4) -> dict[str, Any]:
    """Sweep `grid` on the user's collection into the profile dir `out`, label by agreement
    with the golden plan, and fit the quality model into `model_dir` (None: no training).
    Resumable: (question, plan) pairs already in out/records.jsonl are skipped."""
    from ragserve.eval.tuning import TuneMeta, append_record, read_records, write_meta
    from ragserve.eval.report import environment

    questions = read_questions(questions_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = TuneMeta(model=config.engine.model, dataset=f"collection:{collection}", grid=tuple(grid),
                    quality_metric="golden_agreement", engine=config.engine.backend, seed="questions",
                    query_ids=tuple(q["id"] for q in questions), collection=collection,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), environment=environment())
    write_meta(out, meta)
    done = {(r.query_id, str(r.plan)) for r in read_records(out)}
    asyncio.run(_sweep(collection, questions, tuple(grid), out, config, done, concurrency, append_record))
    report: dict[str, Any] = {"records": len(read_records(out)), "profile": str(out)}
    if model_dir is not None:
        from ragserve.eval.quality_training import train_quality

        report["quality"] = train_quality([out], model_dir)
        report["model_dir"] = str(model_dir)
    return report


async def _sweep(collection: str, questions: Sequence[dict[str, str]], grid: tuple[RagPlan, ...], out: Path,
                 config: Config, done: set[tuple[str, str]], concurrency: int, append: Any) -> None:
    from ragserve.controller import Controller
    from ragserve.eval.tuning import TuneRecord
    from ragserve.metis.planner import chunk_prompt_tokens
    from ragserve.metis.quality import TOP_K, retrieval_summary
    from ragserve.runtime import build_runtime

    rt = build_runtime(config, metis=False)
    controller = Controller(rt.engine, rt.retriever, config)
    from ragserve.metis.planner import PlannerSetup

    cost = PlannerSetup.build(rt.engine, config).cost   # the planners' own pricing of a plan
    limit = min(rt.engine.model.max_context, config.engine.max_context_tokens, rt.engine.stats().kv_capacity_tokens)
    gate = asyncio.Semaphore(max(1, concurrency))
    col = rt.retriever.collection(collection)
    try:
        async def one(q: dict[str, str]) -> None:
            async with gate:
                hits, _ = await asyncio.to_thread(rt.retriever.retrieve, col, q["question"], TOP_K, None)
                summary = retrieval_summary(hits)
                counts = chunk_prompt_tokens(rt.engine, col, hits, cost.config.overhead_tokens_per_chunk)
                golden = golden_plan(grid, cost, counts, rt.engine.count_tokens(q["question"]), limit)
                gold = await controller.query(q["question"], collection, plan=golden)
                for plan in grid:
                    if (q["id"], str(plan)) in done or plan.num_chunks > len(hits):
                        continue
                    r = gold if plan == golden else await controller.query(q["question"], collection, plan=plan)
                    label = agreement(r.answer, gold.answer)
                    append(out, TuneRecord(q["id"], q["question"], plan, label, r.timings.total_s, f1=label,
                                           ttft_s=r.timings.ttft_s, prompt_tokens=r.prompt_tokens,
                                           output_tokens=r.output_tokens, num_calls=r.num_calls,
                                           answer=r.answer, retrieval=summary))
        await asyncio.gather(*(one(q) for q in questions))
    finally:
        await rt.close()
