"""Training the learned profiler (`ragserve tune train-profiler`): tuning profiles ->
labels -> scikit-learn classifiers, cross-validated, saved for `ragserve.metis.learned`.

Training data are tuning profiles (ragserve.eval.tuning): each tuned query's best plan is
turned back into the profile that METIS' rules would prune to a space containing it
(Algorithm 1 inverted, `ragserve.metis.learned.METHOD_PROFILE`):

    best method  map_rerank -> joint_reasoning no,  complexity low
                 stuff      -> joint_reasoning yes, complexity low
                 map_reduce -> joint_reasoning yes, complexity high
                 (refine, if tuned, counts as map_reduce)
    num_chunks c -> pieces = clamp(ceil(c / 2), 1, 10): the pruned range [p, 3p] then
                 holds c (c=1 -> [1,3], 3 -> [2,6], 6 -> [3,9], 10 -> [5,15])
    summary range: from the map_reduce labels' intermediate lengths (tokens / 1.3 words),
                 the (min, max) over the training set clamped to 30-200; (30, 60) when no
                 label is map_reduce. One range per model, stored in the spec.

Models: each classifier is StandardScaler + LogisticRegression (a constant predictor when
the labels hold one class). The training report holds cross-validated accuracy vs the
tuned labels and the measured inference time.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, NotFound
from ragserve.metis.learned import (DEFAULT_SUMMARY_RANGE, METHOD_PROFILE, SPEC_FILE, CachedQueryEmbedder,
                                    FeatureSpec, LearnedProfilerModel, featurize)
from ragserve.metis.profile import MAX_PIECES, MAX_SUMMARY, MIN_PIECES, MIN_SUMMARY, QueryProfile
from ragserve.metis.rules import PlannerRules, prune

logger = logging.getLogger(__name__)

WORDS_PER_TOKEN = 1 / PlannerRules().tokens_per_summary_unit   # the rules' word -> token factor, inverted


# ---------------------------------------------------------------------------- labels

@dataclass(frozen=True)
class ProfileLabel:
    method: str              # map_rerank | stuff | map_reduce
    pieces: int              # 1-10
    summary_words: int | None   # map_reduce's intermediate length in words; None otherwise


def label_from_plan(plan: RagPlan) -> ProfileLabel:
    """The profile targets of a tuned best plan (module docstring)."""
    method = Method.MAP_REDUCE.value if plan.method is Method.REFINE else plan.method.value
    pieces = min(MAX_PIECES, max(MIN_PIECES, math.ceil(plan.num_chunks / 2)))
    words = None
    if method == Method.MAP_REDUCE.value and plan.intermediate_tokens:
        words = round(plan.intermediate_tokens * WORDS_PER_TOKEN)
    return ProfileLabel(method, pieces, words)


def summary_range_from(labels: Sequence[ProfileLabel]) -> tuple[int, int]:
    words = [l.summary_words for l in labels if l.summary_words]
    if not words:
        return DEFAULT_SUMMARY_RANGE
    lo = min(MAX_SUMMARY, max(MIN_SUMMARY, min(words)))
    hi = min(MAX_SUMMARY, max(lo, max(words)))
    return lo, hi


# ---------------------------------------------------------------------------- model

def _classifier(labels: Sequence[Any]) -> Any:
    """StandardScaler + LogisticRegression, or a constant predictor for one class."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(labels)) < 2:
        return DummyClassifier(strategy="prior")
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))


def _fit(x: np.ndarray, labels: Sequence[Any]) -> Any:
    model = _classifier(labels)
    model.fit(x, np.asarray(labels))
    return model


# ---------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainingSet:
    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    labels: tuple[ProfileLabel, ...]
    best_plans: tuple[RagPlan, ...]
    max_chunks: int                      # largest num_chunks in the tuned grids
    sources: tuple[str, ...] = ()


def training_query_ids(path: str | Path) -> set[str]:
    """Ids of the queries a saved learned profiler was trained on (an evaluation of it
    leaves them out)."""
    spec = Path(path) / SPEC_FILE
    if not spec.is_file():
        raise NotFound(f"no learned profiler at {str(path)!r} (missing {SPEC_FILE})")
    return set(json.loads(spec.read_text()).get("training", {}).get("query_ids", ()))


def training_set(profile_dirs: Sequence[str | Path]) -> TrainingSet:
    """Best plan per tuned query (ragserve.eval.tuning) over one or more profile directories."""
    from ragserve.eval.tuning import best_plans, read_profile

    ids, queries, labels, plans, max_chunks = [], [], [], [], 1
    for directory in profile_dirs:
        meta, records = read_profile(directory)
        max_chunks = max([max_chunks] + [p.num_chunks for p in meta.grid])
        for best in best_plans(records, meta.tolerance).values():
            ids.append(best.query_id)
            queries.append(best.question)
            plans.append(best.plan)
            labels.append(label_from_plan(best.plan))
    if not queries:
        raise BadInput(f"no tuned queries in {[str(d) for d in profile_dirs]}; run ragserve tune first")
    return TrainingSet(tuple(ids), tuple(queries), tuple(labels), tuple(plans), max_chunks,
                       tuple(str(d) for d in profile_dirs))


def covers(profile: QueryProfile, plan: RagPlan, max_chunks: int) -> bool:
    """Would METIS' default rules prune `profile` to a space holding `plan`'s method and chunks?"""
    method = Method.MAP_REDUCE if plan.method is Method.REFINE else plan.method
    return any(p.method is method and p.num_chunks == plan.num_chunks
               for p in prune(profile, PlannerRules(), max(max_chunks, plan.num_chunks)))


def _folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def cross_validate(x: np.ndarray, ts: TrainingSet, spec: FeatureSpec, embedder: Any, k: int = 5
                   ) -> dict[str, Any]:
    """k-fold accuracy vs the tuned labels (method, pieces exact and within 1), and how
    often the predicted profile's pruned space holds the tuned best plan ("coverage");
    with the majority-class baselines. Needs >= 4 queries."""
    n = len(ts.queries)
    if n < 4:
        return {"folds": 0, "note": f"{n} queries: too few to cross-validate"}
    k = min(k, n)
    methods = np.asarray([l.method for l in ts.labels])
    pieces = np.asarray([l.pieces for l in ts.labels])
    summary = summary_range_from(ts.labels)
    hits = Counter()
    for test in _folds(n, k):
        train = np.setdiff1d(np.arange(n), test)
        model = LearnedProfilerModel(spec, _fit(x[train], methods[train]), _fit(x[train], pieces[train]),
                                     summary, embedder)
        maj_m = Counter(methods[train]).most_common(1)[0][0]
        maj_p = Counter(pieces[train]).most_common(1)[0][0]
        for i in test:
            prof = model.profile_features(x[i:i + 1])
            method = next(m for m, (j, c) in METHOD_PROFILE.items()
                          if j == prof.joint_reasoning and c == prof.complexity)
            hits["method"] += method == methods[i]
            hits["pieces"] += prof.pieces == pieces[i]
            hits["pieces_within_1"] += abs(prof.pieces - pieces[i]) <= 1
            hits["coverage"] += covers(prof, ts.best_plans[i], ts.max_chunks)
            hits["majority_method"] += maj_m == methods[i]
            hits["majority_pieces"] += maj_p == pieces[i]
    return {"folds": k, **{f"{key}_accuracy": round(hits[key] / n, 4)
                           for key in ("method", "pieces", "pieces_within_1", "majority_method",
                                       "majority_pieces")},
            "coverage": round(hits["coverage"] / n, 4)}


def measure_inference(model: LearnedProfilerModel, queries: Sequence[str], repeats: int = 3) -> dict[str, Any]:
    """Per-query latency of `profile` in ms: the classifiers alone (features given), and the
    whole call with the query embedding computed, and cached (CachedQueryEmbedder hit)."""
    queries = list(queries)[:50] or ["What is it?"]
    emb = model.embedder.encode(queries) if hasattr(model.embedder, "encode") else \
        np.stack([model.embedder.encode_query(q) for q in queries])
    x = featurize(queries, model.spec, emb)

    def timed(fn: Callable[[int], Any], num: int = len(queries), rounds: int = repeats) -> dict[str, float]:
        ts = []
        for _ in range(rounds):
            for i in range(num):
                t = time.perf_counter()
                fn(i)
                ts.append((time.perf_counter() - t) * 1000)
        ts.sort()
        return {"p50_ms": round(ts[len(ts) // 2], 3), "p95_ms": round(ts[min(len(ts) - 1, int(len(ts) * 0.95))], 3)}

    cached = LearnedProfilerModel(model.spec, model.method_model, model.pieces_model, model.summary_range,
                                  CachedQueryEmbedder(model.embedder))
    for q in queries:
        cached.embedder.encode_query(q)
    return {"classifier_only": timed(lambda i: model.profile_features(x[i:i + 1])),
            "with_cached_embedding": timed(lambda i: cached.profile(queries[i])),
            "with_embedding": timed(lambda i: model.profile(queries[i]), min(10, len(queries)), 1)}


def train_profiler(profile_dirs: Sequence[str | Path], out: str | Path | None = None,
                   embedder: Any = None) -> tuple[LearnedProfilerModel, dict[str, Any]]:
    """Fit the classifiers on the tuned best plans of `profile_dirs`, report cross-validated
    accuracy and inference time, save to `out` (default <first dir>/learned)."""
    ts = training_set(profile_dirs)   # fails fast, before scikit-learn and the embedder load
    import sklearn

    if embedder is None:
        from ragserve.retrieval.embeddings import Embedder
        embedder = Embedder()
    spec = FeatureSpec(embedder.model_id, int(embedder.dim))
    x = featurize(ts.queries, spec, embedder.encode(list(ts.queries)))
    methods = [l.method for l in ts.labels]
    pieces = [l.pieces for l in ts.labels]
    report: dict[str, Any] = {
        "num_queries": len(ts.queries), "sources": list(ts.sources),
        "label_counts": {"method": dict(Counter(methods)), "pieces": {str(k): v for k, v in sorted(Counter(pieces).items())},
                         "best_plan": dict(Counter(str(p) for p in ts.best_plans).most_common())},
        "cross_validation": cross_validate(x, ts, spec, embedder), "sklearn_version": sklearn.__version__,
        "query_ids": list(ts.query_ids)}
    model = LearnedProfilerModel(spec, _fit(x, methods), _fit(x, pieces), summary_range_from(ts.labels), embedder)
    report["inference"] = measure_inference(model, ts.queries)
    model.info = {"training": report}
    target = Path(out) if out else Path(profile_dirs[0]) / "learned"
    model.save(target)
    (target / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return model, report
