"""Factories for the evaluation tests: tuning records, result rows, a fake embedder."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from ragserve.domain import Method, RagPlan
from ragserve.eval.tuning import TuneRecord


def plan(text: str) -> RagPlan:
    from ragserve.domain import RagPlan

    return RagPlan.parse(text)


def make_record(query_id: str = "q1", plan_text: str = "stuff:2", quality: float = 0.5,
                latency_s: float | None = 1.0, question: str | None = None, **overrides: Any) -> TuneRecord:
    values = {"f1": quality, "prompt_tokens": 100, "answer": "x", **overrides}
    return TuneRecord(query_id, question or f"question {query_id}?", plan(plan_text), quality, latency_s, **values)


def make_rows(system: str, qualities: Sequence[float], latencies: Sequence[float],
              plan_text: str = "stuff:2", errors: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Result rows as ragserve.eval.runner writes them; indices in `errors` failed."""
    rows = []
    p = plan(plan_text)
    for i, (q, lat) in enumerate(zip(qualities, latencies)):
        arrival = float(i)
        if i in errors:
            rows.append({"id": f"q{i}", "system": system, "arrival_s": arrival, "start_s": arrival,
                         "finish_s": arrival, "plan": None, "answer": "", "f1": 0.0, "em": 0.0,
                         "rouge_l": 0.0, "numeric": None, "quality": 0.0, "error": "NoFeasiblePlan: x"})
            continue
        rows.append({"id": f"q{i}", "system": system, "arrival_s": arrival, "start_s": arrival,
                     "finish_s": arrival + lat, "plan": str(p), "method": p.method.value,
                     "num_chunks": p.num_chunks, "answer": "a", "f1": q, "em": float(q == 1.0),
                     "rouge_l": q, "numeric": None, "quality": q, "total_s": lat, "ttft_s": lat / 2,
                     "queue_s": 0.0, "profile_s": 0.0, "retrieve_s": 0.01, "prompt_tokens": 100,
                     "output_tokens": 5, "num_calls": 1, "reason": "fit" if system == "metis" else None,
                     "error": None})
    return rows


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text, plus a signal the tests control:
    texts containing a word of `topics[i]` get a large component on axis i."""

    model_id = "fake/hash-embedder"
    dim = 16

    def __init__(self, topics: Sequence[Sequence[str]] = ()) -> None:
        self.topics = [tuple(t) for t in topics]
        self.calls = 0

    def _vector(self, text: str) -> np.ndarray:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        v = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32) * 0.1
        for i, words in enumerate(self.topics):
            if any(w in text.lower() for w in words):
                v[i] += 3.0
        return v / np.linalg.norm(v)

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        self.calls += len(texts)
        return np.stack([self._vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        self.calls += 1
        return self._vector(text)


__all__ = ["FakeEmbedder", "make_record", "make_rows", "plan", "Method"]
