"""Training the tuned controller's quality model from tuning sweeps (`ragserve tune train-quality`).

Flow: a sweep directory (profiles/<model>/<dataset>/) holds one record per (query, plan)
with the quality that plan got; `retrieval_summaries` adds what retrieval found for each
query (re-retrieved once from the sweep's collection, cached in retrieval.jsonl, or read
from the records when the sweep stored it); `training_data` makes one feature row per
record (`ragserve.metis.quality.feature_rows`); `fit` trains a gradient-boosted regressor.

Honesty: `cross_fit` predicts every query with a model that never saw it (k folds by
query), which is what the evaluation and the simulator plan with; `selection_report`
scores plan selection by those predictions against every fixed plan, on the sweep's own
measured qualities and idle latencies.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragserve.domain import RagPlan
from ragserve.metis.quality import TOP_K, QualityModel, feature_rows, retrieval_summary

logger = logging.getLogger(__name__)

RETRIEVAL_FILE = "retrieval.jsonl"


def retrieval_summaries(profile_dir: str | Path, config: Any = None, datasets_root: Any = None,
                        progress: bool = False) -> dict[str, dict[str, list]]:
    """query id -> retrieval summary for every query of the sweep (cached in retrieval.jsonl)."""
    from ragserve.eval.tuning import read_profile

    d = Path(profile_dir)
    meta, records = read_profile(d)
    out: dict[str, dict[str, list]] = {}
    cache = d / RETRIEVAL_FILE
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["query_id"]] = row["retrieval"]
    for r in records:
        if r.retrieval and r.query_id not in out:
            out[r.query_id] = r.retrieval
    missing = [qid for qid in meta.query_ids if qid not in out]
    if missing and not meta.dataset.startswith("collection:"):   # a user collection's records carry theirs
        out.update(_retrieve(meta, missing, cache, config, datasets_root, progress))
    return out


def _retrieve(meta: Any, query_ids: Sequence[str], cache: Path, config: Any, datasets_root: Any,
              progress: bool) -> dict[str, dict[str, list]]:
    from dataclasses import replace

    from ragserve.config import Config
    from ragserve.eval.datasets import ensure_collection, get_spec, load_questions, query_filters
    from ragserve.retrieval.embeddings import Embedder
    from ragserve.retrieval.ingest import Retriever

    config = config or Config()
    config = replace(config, engine=replace(config.engine, model=meta.model))
    spec = get_spec(meta.dataset)
    by_id = {q["id"]: q for q in load_questions(meta.dataset, datasets_root)}
    questions = [by_id[qid] for qid in query_ids if qid in by_id]
    info = ensure_collection(meta.dataset, config, questions, meta.corpus_limit, datasets_root, progress=progress)
    if info.collection != meta.collection:
        logger.warning("sweep collection %s, re-retrieving from %s", meta.collection, info.collection)
    retriever = Retriever(Embedder())
    col = retriever.collection(info.collection)
    out = {}
    with cache.open("a") as f:
        for q in questions:
            hits, _ = retriever.retrieve(col, q["question"], TOP_K, query_filters(spec, q))
            out[q["id"]] = retrieval_summary(hits)
            f.write(json.dumps({"query_id": q["id"], "retrieval": out[q["id"]]}) + "\n")
    return out


@dataclass
class TrainingData:
    x: np.ndarray              # one row per record: query + plan features
    y: np.ndarray              # the record's quality
    groups: np.ndarray         # query index of each row (folds never split a query)
    query_ids: list[str]       # by group index
    plans: list[RagPlan]       # per row
    latency_s: np.ndarray      # per row: the record's idle latency
    grid: tuple[RagPlan, ...]


def training_data(profile_dirs: Sequence[str | Path], **retrieval_kw: Any) -> TrainingData:
    from ragserve.eval.tuning import read_profile

    xs, ys, groups, plans, lats, qids, grid = [], [], [], [], [], [], []
    for d in profile_dirs:
        meta, records = read_profile(d)
        summaries = retrieval_summaries(d, **retrieval_kw)
        grid += [p for p in meta.grid if p not in grid]
        for r in records:
            if r.query_id not in summaries or r.latency_s is None:
                continue
            key = f"{meta.dataset}:{r.query_id}"
            if key not in qids:
                qids.append(key)
            xs.append(feature_rows(r.question, summaries[r.query_id], [r.plan])[0])
            ys.append(r.quality)
            groups.append(qids.index(key))
            plans.append(r.plan)
            lats.append(r.latency_s)
    if not xs:
        raise ValueError(f"no usable records in {[str(d) for d in profile_dirs]}")
    return TrainingData(np.asarray(xs), np.asarray(ys), np.asarray(groups), qids, plans,
                        np.asarray(lats), tuple(grid))


# Ridge strength on standardized features. Chosen on the squad and 2wikimultihopqa sweeps by
# cross-fitted selection quality against GBMs (depth 2-3), random forests and weaker ridges:
# with ~40-150 queries the strongly shrunk linear adjustment was the only one not to lose to
# the plan means alone.
RIDGE_ALPHA = 100.0


def fit(data: TrainingData, rows: np.ndarray | None = None, adjust: bool = True) -> QualityModel:
    """Plan means plus (with `adjust`) a ridge adjustment on the residuals, over `rows`
    (default all)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = np.ones(len(data.y), dtype=bool) if rows is None else rows
    keys = np.asarray([str(p) for p in data.plans])
    means = {k: float(data.y[rows & (keys == k)].mean()) for k in sorted(set(keys[rows]))}
    residual = data.y - np.asarray([means.get(k, 0.0) for k in keys])
    est = (make_pipeline(StandardScaler(), Ridge(alpha=RIDGE_ALPHA)).fit(data.x[rows], residual[rows])
           if adjust else None)
    return QualityModel(est, {"grid": [str(p) for p in data.grid], "plan_means": means,
                              "num_queries": int(len(set(data.groups[rows]))), "num_records": int(rows.sum()),
                              "ridge_alpha": RIDGE_ALPHA if adjust else None})


def fold_of_rows(data: TrainingData, k: int, seed: int = 0) -> np.ndarray:
    """Each row's fold, by query: a query's rows share one."""
    num_groups = int(data.groups.max()) + 1
    order = np.random.default_rng(seed).permutation(num_groups)
    fold_of = np.empty(num_groups, dtype=int)
    fold_of[order] = np.arange(num_groups) % k
    return fold_of[data.groups]


def _predict_rows(model: QualityModel, data: TrainingData, rows: np.ndarray) -> np.ndarray:
    means = model.meta["plan_means"]
    base = np.asarray([means.get(str(data.plans[i]), 0.0) for i in np.flatnonzero(rows)])
    if model.estimator is not None:
        base = base + model.estimator.predict(data.x[rows])
    return np.clip(base, 0.0, 1.0)


def cross_fit(data: TrainingData, k: int = 5, seed: int = 0, adjust: bool = True) -> np.ndarray:
    """Out-of-fold predictions: each query's rows predicted by a model trained without it."""
    folds = fold_of_rows(data, k, seed)
    pred = np.zeros(len(data.y))
    for f in range(k):
        test = folds == f
        if test.any() and (~test).any():
            pred[test] = _predict_rows(fit(data, ~test, adjust), data, test)
    return pred


# The adjustment must earn its place: per-query choice with it must beat the plan means
# alone by this much (cross-fitted, at the default price of a second), or it is left out.
ADJUST_MARGIN = 0.005


def choose_adjust(data: TrainingData, k: int = 5) -> dict[str, Any]:
    """Whether the per-query adjustment helps on this sweep: cross-fitted selection quality at
    tuned.time_value with and without it."""
    from ragserve.config import TunedConfig

    tv = TunedConfig().time_value
    with_adj = selection_report(data, cross_fit(data, k, adjust=True), (tv,))["selected"][str(tv)]["quality"]
    means = selection_report(data, cross_fit(data, k, adjust=False), (tv,))["selected"][str(tv)]["quality"]
    return {"adjust": with_adj > means + ADJUST_MARGIN, "selected_quality_adjusted": with_adj,
            "selected_quality_plan_means": means, "time_value": tv}


def train_quality(profile_dirs: Sequence[str | Path], out: str | Path, k: int = 5, **retrieval_kw: Any
                  ) -> dict[str, Any]:
    """Fit on every record, save to `out`, and report the cross-fitted selection figures."""
    data = training_data(profile_dirs, **retrieval_kw)
    choice = choose_adjust(data, k)
    model = fit(data, adjust=choice["adjust"])
    model.meta.update(profiles=[str(d) for d in profile_dirs], adjustment=choice)
    model.save(out)
    report = {**selection_report(data, cross_fit(data, k, adjust=choice["adjust"])), "adjustment": choice}
    (Path(out) / "cv_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def selection_report(data: TrainingData, pred: np.ndarray, time_values: Sequence[float] = (0.0, 0.01, 0.03)
                     ) -> dict[str, Any]:
    """Per-query choice by predicted quality (minus time_value x idle latency) vs each fixed
    plan, on the records' measured quality and latency; plus how well predictions rank plans."""
    from scipy.stats import spearmanr

    rows_of: dict[int, list[int]] = {}
    for i, g in enumerate(data.groups):
        rows_of.setdefault(int(g), []).append(i)
    full = [g for g, rows in rows_of.items() if len(rows) == len(data.grid)]
    fixed = {}
    for plan in data.grid:
        idx = [i for g in full for i in rows_of[g] if data.plans[i] == plan]
        fixed[str(plan)] = {"quality": float(data.y[idx].mean()), "mean_s": float(data.latency_s[idx].mean())}
    chosen = {}
    for tv in time_values:
        picks = [max(rows_of[g], key=lambda i: pred[i] - tv * data.latency_s[i]) for g in full]
        chosen[str(tv)] = {"quality": float(data.y[picks].mean()), "mean_s": float(data.latency_s[picks].mean())}
    oracle = [max(rows_of[g], key=lambda i: (data.y[i], -data.latency_s[i])) for g in full]
    rho = [spearmanr(pred[rows_of[g]], data.y[rows_of[g]]).statistic for g in full
           if np.ptp(data.y[rows_of[g]]) > 0]
    return {"num_queries": len(full), "fixed": fixed, "selected": chosen,
            "oracle": {"quality": float(data.y[oracle].mean()), "mean_s": float(data.latency_s[oracle].mean())},
            "rank_correlation_mean": float(np.nanmean(rho)) if rho else None,
            "mae": float(np.abs(pred - data.y).mean())}


class CrossFitModel:
    """Plans every query with a model that never saw it: a sweep's queries by the fold model
    trained without their fold, any other question by the model trained on the whole sweep.
    What `ragserve eval --quality DIR` plans with, so a dataset with too few questions to hold
    some out (financebench: 100) is still evaluated honestly."""

    def __init__(self, profile_dirs: Sequence[str | Path], k: int = 5, seed: int = 0, **retrieval_kw: Any) -> None:
        from ragserve.eval.tuning import read_profile

        data = training_data(profile_dirs, **retrieval_kw)
        folds = fold_of_rows(data, k, seed)
        adjust = choose_adjust(data, k)["adjust"]
        self.full = fit(data, adjust=adjust)
        self.folds = [fit(data, folds != f, adjust) for f in range(k)]
        group_fold = {int(g): int(f) for g, f in zip(data.groups, folds)}
        self._fold_of_question: dict[str, int] = {}
        for d in profile_dirs:
            meta, records = read_profile(d)
            for r in records:
                key = f"{meta.dataset}:{r.query_id}"
                if key in data.query_ids:
                    self._fold_of_question[r.question.strip()] = group_fold[data.query_ids.index(key)]
        self.meta = {**self.full.meta, "cross_fit_folds": k}
        self.num_in_sweep = 0   # questions planned by a fold model (reported)

    @property
    def grid(self) -> tuple[RagPlan, ...]:
        return self.full.grid

    def predict(self, question: str, hits: Any, plans: Sequence[RagPlan]) -> list[float]:
        fold = self._fold_of_question.get(question.strip())
        self.num_in_sweep += fold is not None
        return (self.full if fold is None else self.folds[fold]).predict(question, hits, plans)
