"""The learned profiler: scikit-learn classifiers from query features to METIS' profile.

Training data are tuning profiles (ragserve.eval.tuning): each tuned query's best plan is
turned back into the profile that METIS' rules would prune to a space containing it
(Algorithm 1 inverted):

    best method  map_rerank -> joint_reasoning no,  complexity low
                 stuff      -> joint_reasoning yes, complexity low
                 map_reduce -> joint_reasoning yes, complexity high
                 (refine, if tuned, counts as map_reduce)
    num_chunks c -> pieces = clamp(ceil(c / 2), 1, 10): the pruned range [p, 3p] then
                 holds c (c=1 -> [1,3], 3 -> [2,6], 6 -> [3,9], 10 -> [5,15])
    summary range: from the map_reduce labels' intermediate lengths (tokens / 1.3 words),
                 the (min, max) over the training set clamped to 30-200; (30, 60) when no
                 label is map_reduce. One range per model, stored in the spec.

Features: `ragserve.eval.features` (the query embedding + simple text features).

Models: two classifiers, `method` (3 classes) and `pieces`, each StandardScaler +
LogisticRegression (a constant predictor when the labels hold one class). Confidence =
the method classifier's largest class probability (the method decides the pruned space;
METIS gates on it with the 0.9 threshold).

Saved as a directory: `model.joblib` (the estimators) + `profiler.json` (format_version,
feature spec, label mapping, summary range, sklearn/numpy versions, training report with
cross-validated accuracy vs the tuned labels and the measured inference time).

Inference cost: the classifiers run as plain numpy (`_FastHead`, checked against
scikit-learn at load) in microseconds; the query embedding is the expensive part (shared with retrieval through
`CachedQueryEmbedder`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ragserve.domain import Method, RagPlan
from ragserve.eval.features import CachedQueryEmbedder, FeatureSpec, featurize
from ragserve.errors import BadInput, ConfigError, NotFound
from ragserve.profiler import (MAX_PIECES, MAX_SUMMARY, MIN_PIECES, MIN_SUMMARY, Complexity, ProfileSource,
                               QueryProfile)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE, SPEC_FILE = "model.joblib", "profiler.json"
WORDS_PER_TOKEN = 1 / 1.3            # the planner's tokens_per_summary_unit, inverted
DEFAULT_SUMMARY_RANGE = (MIN_SUMMARY, 60)


# ---------------------------------------------------------------------------- labels

METHOD_PROFILE = {   # METIS Algorithm 1 inverted: method -> (joint_reasoning, complexity)
    Method.MAP_RERANK.value: (False, Complexity.LOW),
    Method.STUFF.value: (True, Complexity.LOW),
    Method.MAP_REDUCE.value: (True, Complexity.HIGH),
}


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


class _FastHead:
    """predict_proba of a fitted classifier in plain numpy: one row costs microseconds,
    where sklearn's input validation costs ~0.3 ms per call. Handles StandardScaler +
    LogisticRegression pipelines and constant predictors; anything else uses sklearn."""

    def __init__(self, estimator: Any, probe: np.ndarray) -> None:
        self.estimator = estimator
        self.classes_ = estimator.classes_
        self._const: np.ndarray | None = None
        self._linear: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        steps = getattr(estimator, "steps", None)
        if steps is None and hasattr(estimator, "class_prior_"):        # DummyClassifier
            self._const = np.asarray(estimator.predict_proba(probe[:1])[0], dtype=np.float64)
        elif steps is not None and len(steps) == 2 and hasattr(steps[0][1], "scale_") and hasattr(steps[1][1], "coef_"):
            scaler, lr = steps[0][1], steps[1][1]
            self._linear = (scaler.mean_, scaler.scale_, lr.coef_.T, lr.intercept_)   # (d,), (d,), (d, k'), (k',)
            if not np.allclose(self._proba(probe[:2]), estimator.predict_proba(probe[:2]), atol=1e-6):
                logger.warning("fast path of %s disagrees with scikit-learn; using scikit-learn", type(lr).__name__)
                self._linear = None

    def _proba(self, x: np.ndarray) -> np.ndarray:
        mean, scale, w, b = self._linear
        z = ((x - mean) / scale) @ w + b            # (n, k') ; k' = 1 for two classes
        if z.shape[1] == 1:
            p1 = np.exp(-np.logaddexp(0.0, -z[:, 0]))   # sigmoid, without overflow
            return np.stack([1.0 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self._const is not None:
            return np.tile(self._const, (len(x), 1))
        if self._linear is not None:
            return self._proba(np.asarray(x, dtype=np.float64))
        return self.estimator.predict_proba(x)


class LearnedProfilerModel:
    """Implements `ragserve.profiler.LearnedProfiler`: query -> QueryProfile(source=learned)."""

    def __init__(self, spec: FeatureSpec, method_model: Any, pieces_model: Any,
                 summary_range: tuple[int, int], embedder: Any, info: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.method_model = method_model
        self.pieces_model = pieces_model
        probe = np.random.default_rng(0).normal(size=(2, spec.dim))   # checks the fast path
        self._method = _FastHead(method_model, probe)
        self._pieces = _FastHead(pieces_model, probe)
        self.summary_range = tuple(summary_range)
        self.embedder = embedder
        self.info = info or {}

    def profile(self, query: str) -> QueryProfile:
        emb = np.asarray(self.embedder.encode_query(query), dtype=np.float32)[None, :]   # (1, d)
        return self.profile_features(featurize([query], self.spec, emb))

    def profile_features(self, x: np.ndarray) -> QueryProfile:
        """The profile of one feature row (1, spec.dim): the classifier part of `profile`."""
        method_p = self._method.predict_proba(x)[0]
        method = str(self._method.classes_[int(np.argmax(method_p))])
        pieces_p = self._pieces.predict_proba(x)[0]
        pieces = int(self._pieces.classes_[int(np.argmax(pieces_p))])
        joint, complexity = METHOD_PROFILE[method]
        confidence = float(min(1.0, max(0.0, method_p.max())))
        return QueryProfile(complexity, joint, pieces, self.summary_range if complexity is Complexity.HIGH
                            else DEFAULT_SUMMARY_RANGE, confidence=confidence, source=ProfileSource.LEARNED)

    # -- persistence ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import joblib
        import sklearn

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        joblib.dump({"method": self.method_model, "pieces": self.pieces_model}, d / MODEL_FILE)
        spec = {"format_version": FORMAT_VERSION, "feature_spec": asdict(self.spec),
                "summary_range": list(self.summary_range), "sklearn_version": sklearn.__version__,
                "numpy_version": np.__version__,
                "labels": {"method_to_profile": {m: {"joint_reasoning": j, "complexity": c.value}
                                                 for m, (j, c) in METHOD_PROFILE.items()},
                           "pieces": "clamp(ceil(num_chunks / 2), 1, 10)",
                           "summary_range": "(min, max) of map_reduce labels' intermediate_tokens / 1.3, "
                                            "clamped to 30-200; (30, 60) without map_reduce labels"},
                "confidence": "largest class probability of the method classifier",
                "method_classes": [str(c) for c in self.method_model.classes_],
                "pieces_classes": [int(c) for c in self.pieces_model.classes_], **self.info}
        (d / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str) + "\n")
        return d


def load_profiler(path: str | Path, embedder: Any = None) -> LearnedProfilerModel:
    """Load a saved learned profiler; `embedder` defaults to a new MiniLM Embedder and must
    be the embedding model the profiler was trained with."""
    import joblib
    import sklearn

    d = Path(path)
    if not (d / SPEC_FILE).is_file() or not (d / MODEL_FILE).is_file():
        raise NotFound(f"no learned profiler at {str(d)!r} (need {SPEC_FILE} and {MODEL_FILE}); "
                       "train one with: ragserve tune train-profiler profiles/<model>/<dataset>")
    raw = json.loads((d / SPEC_FILE).read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"learned profiler {str(d)!r} has format_version {raw.get('format_version')!r}; "
                          f"this ragserve reads {FORMAT_VERSION}: retrain it")
    fs = raw["feature_spec"]
    spec = FeatureSpec(fs["embedding_model"], int(fs["embedding_dim"]), tuple(fs["text_features"]),
                       tuple(fs["question_words"]), tuple(fs["keywords"]))
    if raw.get("sklearn_version") != sklearn.__version__:
        logger.warning("learned profiler %s was saved with scikit-learn %s, running %s; retrain if it "
                       "misbehaves", d, raw.get("sklearn_version"), sklearn.__version__)
    if embedder is None:
        from ragserve.retrieval.embeddings import Embedder
        embedder = Embedder()
    if getattr(embedder, "model_id", None) != spec.embedding_model:
        raise ConfigError(f"learned profiler {str(d)!r} was trained on {spec.embedding_model!r} embeddings, "
                          f"the embedder is {getattr(embedder, 'model_id', None)!r}")
    models = joblib.load(d / MODEL_FILE)
    return LearnedProfilerModel(spec, models["method"], models["pieces"], tuple(raw["summary_range"]),
                                embedder, info={k: raw[k] for k in ("training",) if k in raw})


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
    from ragserve.planner import PlannerRules, prune

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
