"""Predicted answer quality per (query, plan): the tuned controller's quality input.

Who owns what: `ragserve tune` sweeps record the quality every plan got on real questions;
`ragserve.eval.quality_training` fits a regressor on them; this module holds the features
and the fitted model's inference (no training code, no engine). The planner asks for the
quality of every candidate of one query in one call.

Features come from the query *and* from what retrieval found, which METIS' profiler never
sees: top-k similarity scores and their gaps (a clear winner suggests one chunk suffices; a
flat top suggests the answer is spread), chunk lengths, how many distinct documents the
top chunks come from (multi-hop questions pull several), the question's form (wh-word,
length); and per plan: method, chunk count, summary length, and the retrieval evidence
the plan actually reads (the score of its last chunk, its distinct documents, its tokens).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragserve.domain import Method, RagPlan, RetrievedChunk
from ragserve.errors import ConfigError

FEATURE_VERSION = 1
TOP_K = 10
_WH = ("what", "who", "when", "where", "which", "why", "how many", "how much", "how", "is", "did", "does")
_METHODS = tuple(Method)
MODEL_FILE = "quality_model.joblib"
META_FILE = "quality_model.json"


def retrieval_summary(hits: Sequence[RetrievedChunk]) -> dict[str, list]:
    """What the features need from retrieval, as plain lists (stored in sweep records)."""
    return {"scores": [round(float(h.score), 5) for h in hits[:TOP_K]],
            "doc_ids": [h.chunk.doc_id for h in hits[:TOP_K]],
            "tokens": [int(h.chunk.num_tokens) for h in hits[:TOP_K]]}


def query_features(question: str, retrieval: dict[str, list]) -> list[float]:
    scores = list(retrieval["scores"])[:TOP_K]
    tokens = list(retrieval["tokens"])[:TOP_K]
    docs = list(retrieval["doc_ids"])[:TOP_K]
    pad = scores + [scores[-1] if scores else 0.0] * (TOP_K - len(scores))
    q = question.strip().lower()
    wh = [1.0 if q.startswith(w) else 0.0 for w in _WH]
    return [*pad, pad[0] - pad[1], pad[0] - pad[2], pad[0] - pad[-1], float(np.mean(pad[:3])),
            len(set(docs[:3])), len(set(docs[:6])), float(np.mean(tokens[:3])) if tokens else 0.0,
            len(q.split()), q.count(" and ") + q.count(","), *wh]


def plan_features(plan: RagPlan, retrieval: dict[str, list]) -> list[float]:
    n = plan.num_chunks
    scores = list(retrieval["scores"])[:n] or [0.0]
    docs = retrieval["doc_ids"][:n]
    tokens = retrieval["tokens"][:n]
    onehot = [1.0 if plan.method is m else 0.0 for m in _METHODS]
    return [*onehot, n, math.log1p(plan.intermediate_tokens), scores[-1], float(np.mean(scores)),
            scores[0] - scores[-1], len(set(docs)), float(sum(tokens))]


def feature_rows(question: str, retrieval: dict[str, list], plans: Sequence[RagPlan]) -> np.ndarray:
    q = query_features(question, retrieval)
    return np.asarray([q + plan_features(p, retrieval) for p in plans], dtype=np.float64)


@dataclass
class QualityModel:
    """Predicted quality = the plan's mean quality in the sweep + a regularized per-query
    adjustment (`estimator`, fitted on the residuals from `feature_rows`).

    Why this shape: a sweep has a few hundred queries and noisy labels (F1 is mostly 0 or 1
    per answer), so a free-form regressor overfits and loses to always running the best fixed
    plan; anchored on the plan means it can only move away from them where query and
    retrieval evidence says so. `predict` is the planner's hot path (one call per query)."""

    estimator: Any                 # residual regressor on feature_rows; None = plan means only
    meta: dict[str, Any]           # "grid", "plan_means" {plan: mean quality}, provenance

    def predict(self, question: str, hits: Sequence[RetrievedChunk], plans: Sequence[RagPlan]) -> list[float]:
        return self.predict_summary(question, retrieval_summary(hits), plans)

    def predict_summary(self, question: str, retrieval: dict[str, list], plans: Sequence[RagPlan]) -> list[float]:
        if not plans:
            return []
        means = self.meta.get("plan_means", {})
        base = np.asarray([means.get(str(p), 0.0) for p in plans])
        if self.estimator is not None:
            base = base + self.estimator.predict(feature_rows(question, retrieval, plans))
        return [min(1.0, max(0.0, float(v))) for v in base]

    @cached_property
    def grid(self) -> tuple[RagPlan, ...]:
        """The plans the model was trained on: the candidates it can speak for (parsed once:
        the planner reads it for every query)."""
        return tuple(RagPlan.parse(p) for p in self.meta["grid"])

    def save(self, directory: str | Path) -> Path:
        import joblib

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.estimator, d / MODEL_FILE)   # None pickles too: plan means only
        (d / META_FILE).write_text(json.dumps({**self.meta, "feature_version": FEATURE_VERSION}, indent=2) + "\n")
        return d


def load_quality_model(directory: str | Path) -> QualityModel:
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"no quality model in {str(d)!r} (missing {META_FILE}); train one with "
                          f"`ragserve tune train-quality PROFILE_DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("feature_version") != FEATURE_VERSION:
        raise ConfigError(f"quality model {str(d)!r} has feature version {meta.get('feature_version')}, "
                          f"this ragserve reads {FEATURE_VERSION}; retrain it (ragserve tune train-quality)")
    try:
        import joblib
    except ImportError:   # pragma: no cover - the eval extra
        raise ConfigError("the quality model needs scikit-learn and joblib: pip install 'ragserve[eval]'") from None
    return QualityModel(joblib.load(d / MODEL_FILE), meta)
