"""The learned profiler at serving time: query features -> scikit-learn classifiers ->
METIS' profile (training lives in `ragserve.eval.training`).

Features: a query's sentence embedding followed by simple text features, as described by
the saved `FeatureSpec`:

    [all-MiniLM-L6-v2 embedding (384 floats, unit length)]
    [word count / 10, character count / 100, digit count]
    [one-hot question word: what/who/when/where/which/why/how/yes-no/summarize/other]
    [counts of "and", "compare", "why", "summar", "difference", "both"]

Models: two classifiers, `method` (3 classes) and `pieces`. The predicted method maps back
to the profile METIS' rules prune to that method (`METHOD_PROFILE`, Algorithm 1 inverted).
Confidence = the method classifier's largest class probability (the method decides the
pruned space; METIS gates on it with the 0.9 threshold).

Saved as a directory: `model.joblib` (the estimators) + `profiler.json` (format_version,
feature spec, label mapping, summary range, sklearn/numpy versions, training report).

Inference cost: the classifiers run as plain numpy (`_FastHead`, checked against
scikit-learn at load) in microseconds; the query embedding is the expensive part, shared
with retrieval through `CachedQueryEmbedder`.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragserve.domain import Method
from ragserve.errors import BadInput, ConfigError, NotFound
from ragserve.metis.profile import MIN_SUMMARY, Complexity, ProfileSource, QueryProfile

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE, SPEC_FILE = "model.joblib", "profiler.json"
DEFAULT_SUMMARY_RANGE = (MIN_SUMMARY, 60)   # the summary range of a low-complexity profile

METHOD_PROFILE = {   # METIS Algorithm 1 inverted: method -> (joint_reasoning, complexity)
    Method.MAP_RERANK.value: (False, Complexity.LOW),
    Method.STUFF.value: (True, Complexity.LOW),
    Method.MAP_REDUCE.value: (True, Complexity.HIGH),
}


# ---------------------------------------------------------------------------- features

QUESTION_WORDS = ("what", "who", "when", "where", "which", "why", "how", "yesno", "summarize", "other")
_YES_NO = {"is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "had", "will",
           "would", "should"}
KEYWORDS = ("and", "compare", "why", "summar", "difference", "both")
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector holds, in order; saved with the model and checked at load."""

    embedding_model: str
    embedding_dim: int
    text_features: tuple[str, ...] = ()
    question_words: tuple[str, ...] = QUESTION_WORDS
    keywords: tuple[str, ...] = KEYWORDS

    def __post_init__(self) -> None:
        if not self.text_features:
            names = ("words_div10", "chars_div100", "digits") + tuple(f"qword_{w}" for w in self.question_words) \
                + tuple(f"count_{k}" for k in self.keywords)
            object.__setattr__(self, "text_features", names)

    @property
    def dim(self) -> int:
        return self.embedding_dim + len(self.text_features)


def question_word(query: str) -> str:
    words = _WORD.findall(query.lower())
    if not words:
        return "other"
    if words[0].startswith("summar") or "summarize" in words[:3] or "summarise" in words[:3]:
        return "summarize"
    for w in words[:4]:   # "In which year ...", "According to ..., how much ..."
        if w in ("what", "who", "when", "where", "which", "why", "how"):
            return w
    if words[0] in _YES_NO:
        return "yesno"
    for w in words:
        if w in ("what", "who", "when", "where", "which", "why", "how"):
            return w
    return "other"


def text_features(query: str, spec: FeatureSpec) -> list[float]:
    lower = query.lower()
    words = _WORD.findall(lower)
    qword = question_word(query)
    out = [len(words) / 10.0, len(query) / 100.0, float(sum(ch.isdigit() for ch in query))]
    out += [1.0 if qword == w else 0.0 for w in spec.question_words]
    for k in spec.keywords:
        out.append(float(sum(1 for w in words if w == k)) if k in ("and", "both", "why")
                   else float(lower.count(k)))
    return out


def featurize(queries: Sequence[str], spec: FeatureSpec, embeddings: np.ndarray) -> np.ndarray:
    """(len(queries), spec.dim) float32: embeddings (n, embedding_dim) then text features."""
    emb = np.asarray(embeddings, dtype=np.float32).reshape(len(queries), -1)   # (n, d)
    if emb.shape[1] != spec.embedding_dim:
        raise BadInput(f"embeddings have dim {emb.shape[1]}, the feature spec expects {spec.embedding_dim}")
    text = np.asarray([text_features(q, spec) for q in queries], dtype=np.float32).reshape(len(queries), -1)
    return np.concatenate([emb, text], axis=1)   # (n, dim)


class CachedQueryEmbedder:
    """An Embedder whose `encode_query` remembers its last `max_entries` queries, so the
    retriever and the learned profiler embed each query once. Delegates everything else."""

    def __init__(self, inner: Any, max_entries: int = 256) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode_query(self, text: str) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        vector = self.inner.encode_query(text)
        with self._lock:
            self._cache[text] = vector
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return vector

    def __getattr__(self, name: str) -> Any:   # model_id, dim, encode, model, ...
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------- model

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
    """Implements `ragserve.metis.profile.LearnedProfiler`: query -> QueryProfile(source=learned)."""

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
