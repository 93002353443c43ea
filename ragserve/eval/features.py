"""Query features of the learned profiler (ragserve.eval.learned): a query's sentence
embedding followed by simple text features, as described by a saved `FeatureSpec`.

    [all-MiniLM-L6-v2 embedding (384 floats, unit length)]
    [word count / 10, character count / 100, digit count]
    [one-hot question word: what/who/when/where/which/why/how/yes-no/summarize/other]
    [counts of "and", "compare", "why", "summar", "difference", "both"]

`CachedQueryEmbedder` lets the retriever and the profiler share one embedder, so the
profiler reuses the embedding retrieval just computed for the same query.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ragserve.errors import BadInput

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
