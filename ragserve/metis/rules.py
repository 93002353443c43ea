"""Rules: a query profile -> the pruned space of candidate RAG plans (METIS §4.2, §5).

Who owns what: the profiler describes the query; the planner proposes the quality-safe
plans (`prune`, rules held as data in `PlannerRules`); the scheduler later picks one of
them under the current memory load. `PlanPruner.plan` adds METIS' reliability gate: a
profile below the confidence threshold is not trusted, and the union of the pruned spaces
of the last 10 confident queries is proposed instead (`ConfidenceGate`).

Default rules (METIS Algorithm 1, first match wins):

    joint_reasoning: no                    -> {map_rerank}
    joint_reasoning: yes, complexity: low  -> {stuff}
    joint_reasoning: yes, complexity: high -> {stuff, map_reduce}
    num_chunks in [1*n, 3*n], n = pieces, capped by the chunks available
    intermediate_tokens: `num_intermediate_values` values spread over the summary range

Units: the profiler's summary range is in *words* (as METIS' prompt asks); plans carry
*tokens*, so the range is multiplied by `tokens_per_summary_unit` (1.3 tokens per English
word). Set it to 1.0 for a profiler that answers in tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from ragserve.domain import Method, RagPlan
from ragserve.errors import BadInput, ConfigError
from ragserve.metis.profile import Complexity, QueryProfile

# Methods whose plans carry an intermediate length (summary cap / refined-answer cap).
_INTERMEDIATE_METHODS = (Method.MAP_REDUCE, Method.REFINE)


@dataclass(frozen=True)
class MethodRule:
    """When a profile matches (None = any value), offer these synthesis methods."""

    methods: tuple[Method, ...]
    joint_reasoning: bool | None = None
    complexity: Complexity | None = None

    def matches(self, profile: QueryProfile) -> bool:
        return ((self.joint_reasoning is None or self.joint_reasoning == profile.joint_reasoning)
                and (self.complexity is None or self.complexity == profile.complexity))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MethodRule":
        """{"when": {"joint_reasoning": bool, "complexity": "high"|"low"}, "methods": [...]}"""
        unknown = set(raw) - {"when", "methods"}
        if unknown or "methods" not in raw:
            raise ConfigError(f"planner rule {raw!r} must have 'methods' and optional 'when' only")
        when = raw.get("when") or {}
        bad = set(when) - {"joint_reasoning", "complexity"}
        if bad:
            raise ConfigError(f"planner rule condition(s) {sorted(bad)} unknown; "
                              "use joint_reasoning and/or complexity")
        joint = when.get("joint_reasoning")
        if joint is not None and not isinstance(joint, bool):
            raise ConfigError(f"planner rule joint_reasoning={joint!r} must be true or false")
        complexity = when.get("complexity")
        try:
            parsed = Complexity(str(complexity).lower()) if complexity is not None else None
            methods = tuple(Method.parse(str(m)) for m in raw["methods"])
        except ValueError as exc:
            raise ConfigError(f"planner rule {raw!r}: {exc}") from None
        if not methods:
            raise ConfigError(f"planner rule {raw!r} offers no methods")
        return cls(methods=methods, joint_reasoning=joint, complexity=parsed)


METIS_RULES = (
    MethodRule((Method.MAP_RERANK,), joint_reasoning=False),
    MethodRule((Method.STUFF,), joint_reasoning=True, complexity=Complexity.LOW),
    MethodRule((Method.STUFF, Method.MAP_REDUCE), joint_reasoning=True,
               complexity=Complexity.HIGH),
)


@dataclass(frozen=True)
class PlannerRules:
    """Profile -> plan rules, as data. Load from a mapping (YAML) with `from_dict`."""

    rules: tuple[MethodRule, ...] = METIS_RULES
    """First matching rule gives the synthesis methods; a profile no rule matches is a
    config error."""
    min_chunks_factor: float = 1.0
    """Fewest chunks = round(factor * pieces), at least 1."""
    max_chunks_factor: float = 3.0
    """Most chunks = round(factor * pieces); 3 = retriever redundancy + slack (METIS fn. 5)."""
    num_intermediate_values: int = 3
    """How many intermediate lengths span the summary range (lo, ..., hi) per chunk count."""
    tokens_per_summary_unit: float = 1.3
    """Summary range unit -> tokens: 1.3 for words (METIS' prompt), 1.0 for tokens."""
    offer_refine: bool = False
    """Also offer `refine` wherever `map_reduce` is offered (not in METIS' rules)."""
    confidence_threshold: float = 0.9
    """Profiles below this confidence use the recent union instead (METIS §5)."""
    history_size: int = 10
    """How many recent confident pruned spaces form that union."""

    def __post_init__(self) -> None:
        if not 0 < self.min_chunks_factor <= self.max_chunks_factor:
            raise ConfigError(f"chunk factors min={self.min_chunks_factor} "
                              f"max={self.max_chunks_factor} need 0 < min <= max")
        if self.num_intermediate_values < 1:
            raise ConfigError(
                f"num_intermediate_values={self.num_intermediate_values} must be >= 1")
        if self.tokens_per_summary_unit <= 0:
            raise ConfigError(f"tokens_per_summary_unit={self.tokens_per_summary_unit} must be > 0")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError(f"confidence_threshold={self.confidence_threshold} outside 0-1")
        if self.history_size < 1:
            raise ConfigError(f"history_size={self.history_size} must be >= 1")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PlannerRules":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown planner key(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(raw)
        if "rules" in values:
            if not isinstance(values["rules"], list) or not values["rules"]:
                raise ConfigError(
                    f"planner rules must be a non-empty list, got {values['rules']!r}")
            values["rules"] = tuple(MethodRule.from_dict(r) for r in values["rules"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path, **settings: Any) -> "PlannerRules":
        """The rules file at `path` (YAML), with `settings` on top (None = not set). A key
        set both in the file and in `settings` must have the same value there."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"planner rules file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"planner rules file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"planner rules file {str(p)!r} must hold a mapping")
        for key, value in settings.items():
            if value is not None and key in raw and raw[key] != value:
                raise ConfigError(f"planner rules file {str(p)!r} sets {key}={raw[key]!r} and the metis "
                                  f"section sets {key}={value!r}; set it in one place")
        return cls.from_dict({**raw, **{k: v for k, v in settings.items() if v is not None}})

    @classmethod
    def from_config(cls, metis: Any) -> "PlannerRules":
        """The rules of a `MetisConfig`: its rules_file (or METIS' defaults) plus the two keys
        the metis section may also set, offer_refine and confidence_threshold. Precedence:
        a key set in one place holds; set in both, the values must agree (else ConfigError);
        set in neither, the default here."""
        settings = {"offer_refine": metis.offer_refine, "confidence_threshold": metis.confidence_threshold}
        if metis.rules_file:
            return cls.load(metis.rules_file, **settings)
        return cls.from_dict({k: v for k, v in settings.items() if v is not None})

    def methods_for(self, profile: QueryProfile) -> tuple[Method, ...]:
        for rule in self.rules:
            if rule.matches(profile):
                methods = rule.methods
                offer = self.offer_refine and Method.MAP_REDUCE in methods
                if offer and Method.REFINE not in methods:
                    methods += (Method.REFINE,)
                return methods
        raise ConfigError(f"no planner rule matches profile {profile}; add a catch-all rule")

    def chunk_range(self, pieces: int, max_chunks: int) -> tuple[int, int]:
        lo = min(max_chunks, max(1, round(self.min_chunks_factor * pieces)))
        hi = min(max_chunks, max(lo, round(self.max_chunks_factor * pieces)))
        return lo, hi

    def intermediate_values(self, summary_range: tuple[int, int]) -> tuple[int, ...]:
        lo, hi = (max(1, round(v * self.tokens_per_summary_unit)) for v in summary_range)
        k = self.num_intermediate_values
        if k == 1 or lo == hi:
            return (round((lo + hi) / 2),)
        return tuple(sorted({round(lo + i * (hi - lo) / (k - 1)) for i in range(k)}))


def degenerate(plan: RagPlan) -> bool:
    """map_reduce or refine over one chunk: a summary of the only passage, then an answer from
    that summary. It can only lose what a stuff call over the same chunk keeps."""
    return plan.method in _INTERMEDIATE_METHODS and plan.num_chunks < 2


# Below the confidence gate with no confident history yet, nothing about the query is
# trusted: stuff over the top chunks is the plan that degrades least when the profile is
# wrong (a one-fact question still gets its chunk; a multi-hop one gets a few).
SAFE_METHOD = Method.STUFF
SAFE_MAX_CHUNKS = 3


def safe_plans(max_chunks: int) -> list[RagPlan]:
    return [RagPlan(SAFE_METHOD, n) for n in range(1, min(SAFE_MAX_CHUNKS, max_chunks) + 1)]


def prune(profile: QueryProfile, rules: PlannerRules, max_chunks: int) -> list[RagPlan]:
    """The quality-safe plans for `profile`: by method (rule order), chunks, intermediate
    length. `max_chunks` = chunks available. Degenerate plans (`degenerate`) are never
    offered; a profile whose methods leave nothing else gets stuff over its chunk range."""
    if max_chunks < 1:
        raise BadInput(f"max_chunks={max_chunks}: the collection returned no chunks to plan over")
    lo, hi = rules.chunk_range(profile.pieces, max_chunks)
    inter = rules.intermediate_values(profile.summary_range)
    plans = []
    for method in dict.fromkeys(rules.methods_for(profile)):   # de-duplicated, in order
        for n in range(lo, hi + 1):
            if method in _INTERMEDIATE_METHODS:
                if n >= 2:
                    plans.extend(RagPlan(method, n, t) for t in inter)
            else:
                plans.append(RagPlan(method, n))
    return plans or [RagPlan(SAFE_METHOD, n) for n in range(lo, hi + 1)]


class ConfidenceGate:
    """Remembers the pruned spaces of the last `history_size` confident profiles."""

    def __init__(self, threshold: float = 0.9, history_size: int = 10) -> None:
        self.threshold = threshold
        self._history: deque[tuple[RagPlan, ...]] = deque(maxlen=history_size)
        self._union: tuple[RagPlan, ...] | None = None   # cache, reset by record()

    def is_confident(self, profile: QueryProfile) -> bool:
        return profile.confidence >= self.threshold

    def record(self, plans: Sequence[RagPlan]) -> None:
        self._history.append(tuple(plans))
        self._union = None

    def union(self, max_chunks: int) -> list[RagPlan]:
        """Union of the remembered spaces, limited to `max_chunks`; empty with no history."""
        if self._union is None:
            # keyed on the method's plain value: hashing the enum itself is a Python call
            seen = {(p.method._value_, p.num_chunks, p.intermediate_tokens): p
                    for space in self._history for p in space}
            self._union = tuple(seen[key] for key in sorted(seen))
        return [p for p in self._union if p.num_chunks <= max_chunks]

    @property
    def num_remembered(self) -> int:
        return len(self._history)


@dataclass(frozen=True)
class PlanSpace:
    """What the planner hands the scheduler for one query."""

    plans: tuple[RagPlan, ...]   # candidate plans (prune's order); the scheduler picks one
    fallback: Method             # used with "as many chunks as fit" when no candidate fits
    from_history: bool = False   # low confidence: plans are the recent union, not this profile's
    profile: QueryProfile | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"pruned": [p.to_dict() for p in self.plans], "fallback": self.fallback.value,
                "from_history": self.from_history}


def fallback_method(profile: QueryProfile) -> Method:
    """METIS: map_rerank without joint reasoning, stuff with joint reasoning."""
    return Method.STUFF if profile.joint_reasoning else Method.MAP_RERANK


class PlanPruner:
    """`prune` plus the confidence gate. Holds state (the gate's history): one per collection."""

    def __init__(self, rules: PlannerRules | None = None) -> None:
        self.rules = rules or PlannerRules()
        self.gate = ConfidenceGate(self.rules.confidence_threshold, self.rules.history_size)

    def plan(self, profile: QueryProfile, max_chunks: int) -> PlanSpace:
        pruned = prune(profile, self.rules, max_chunks)
        if self.gate.is_confident(profile):
            self.gate.record(pruned)
            return PlanSpace(tuple(pruned), fallback_method(profile), False, profile)
        recent = self.gate.union(max_chunks)
        if not recent:   # nothing trusted yet, the profile included: the safe space
            return PlanSpace(tuple(safe_plans(max_chunks)), SAFE_METHOD, False, profile)
        # The profile's joint_reasoning is not trusted either: take the fallback from the
        # union (stuff if it offers any joint-reasoning method).
        joint = any(p.method is not Method.MAP_RERANK for p in recent)
        return PlanSpace(tuple(recent), Method.STUFF if joint else Method.MAP_RERANK, True, profile)
