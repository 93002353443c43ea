"""The query profile: what a query needs in METIS' four dimensions (arXiv 2412.10543 §4.1).

Who owns what: a profiler only *describes* a query (`QueryProfile`); the rules
(`ragserve.metis.rules`) turn a profile into candidate plans; the scheduler picks one.
Two profilers fill the same type: the LLM profiler (`ragserve.metis.llm_profiler`, async,
on an engine) and a learned one through the synchronous `LearnedProfiler` protocol
(`ragserve.metis.learned`). Feedback examples (METIS §5, `ragserve.metis.feedback`) pair a
query with the profile it should have had.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

MIN_PIECES, MAX_PIECES = 1, 10
MIN_SUMMARY, MAX_SUMMARY = 30, 200   # METIS' summary-length range (words in the paper's prompt)


class Complexity(str, Enum):
    HIGH = "high"
    LOW = "low"


class ProfileSource(str, Enum):
    LLM = "llm"            # parsed from an LLM profiler's output
    LEARNED = "learned"    # a trained classifier (LearnedProfiler)
    FALLBACK = "fallback"  # the profiler failed; a fixed default with confidence 0


@dataclass(frozen=True)
class QueryProfile:
    """What a query needs, in METIS' four dimensions, plus how sure the profiler is."""

    complexity: Complexity
    joint_reasoning: bool            # must the answer combine several passages?
    pieces: int                      # pieces of information needed, 1-10
    summary_range: tuple[int, int]   # (lo, hi) summary length per chunk, 30-200, lo <= hi
    confidence: float = 1.0          # 0-1; below the planner's threshold the profile is not trusted
    source: ProfileSource = ProfileSource.LLM

    def __post_init__(self) -> None:
        if not MIN_PIECES <= self.pieces <= MAX_PIECES:
            raise ValueError(f"pieces={self.pieces} outside {MIN_PIECES}-{MAX_PIECES}")
        lo, hi = self.summary_range
        if not MIN_SUMMARY <= lo <= hi <= MAX_SUMMARY:
            raise ValueError(f"summary_range={self.summary_range} must be ordered within "
                             f"{MIN_SUMMARY}-{MAX_SUMMARY}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence={self.confidence} outside 0-1")

    def __str__(self) -> str:
        lo, hi = self.summary_range
        joint = "joint" if self.joint_reasoning else "single"
        return (f"{self.complexity.value}/{joint}/p{self.pieces}/s{lo}-{hi}"
                f"/c{self.confidence:.2f}/{self.source.value}")

    def to_dict(self) -> dict[str, Any]:
        return {"complexity": self.complexity.value, "joint_reasoning": self.joint_reasoning,
                "pieces": self.pieces, "summary_range": list(self.summary_range),
                "confidence": round(self.confidence, 4), "source": self.source.value}

    def to_json(self) -> str:
        """The four dimensions as the profiler is asked to write them (few-shot answers)."""
        return json.dumps({"complexity": self.complexity.value,
                           "joint_reasoning": self.joint_reasoning, "pieces": self.pieces,
                           "summary_range": list(self.summary_range)})


@runtime_checkable
class LearnedProfiler(Protocol):
    """A synchronous profiler (e.g. a trained classifier). Returns source=learned profiles."""

    def profile(self, query: str) -> QueryProfile:
        ...


def fallback_profile() -> QueryProfile:
    """Used when the profiler fails. Confidence 0, so the planner falls back to the union of
    recent pruned spaces; with no history, joint+low gives stuff over 2-6 chunks: stuff is
    METIS' own fallback for joint queries, robust on every query type, and its cost stays
    bounded (map_reduce with long summaries costs minutes per query on a CPU)."""
    return QueryProfile(Complexity.LOW, True, 2, (MIN_SUMMARY, 60),
                        confidence=0.0, source=ProfileSource.FALLBACK)


@dataclass(frozen=True)
class FeedbackExample:
    """One METIS feedback result: the profile the profiler should have given for a query."""

    query: str
    profile: QueryProfile
