"""CacheBlend quality gate: is blending safe for this model and collection, and at what ratio?

Blending reuses chunk KV computed without the other chunks; how much that costs in quality
depends on the model (some garble blended output outright) and on the text. The gate
measures it on the collection's own chunks before serving:

    check(blender, tokenizer, chunks, ...)   -> GateVerdict: for each candidate ratio, the
        first-token KL(full || blend) and first-token agreement over sampled prompts (a few
        chunks + a question, in the answer layout), and the smallest ratio that passed
    save_verdict(store, verdict)              -> a JSON record beside the model's chunk KV
    BlendGate(store, config).policy(name)     -> BlendPolicy: the engine's per-call rule: the
        verdict's ratio, a refusal when no ratio passed, or the configured ratio when the
        collection was never checked

The signals are the cheap ones (one prefill per ratio, no decoding): on the benchmark
(eval/bench_blend.py) a blend whose first token disagrees or whose KL is high is the one
whose answer changes. Owners: the gate decides *whether and how much* to blend; `Blender`
does it; the engine asks `BlendGate` per call.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from ragserve.config import BlendConfig
from ragserve.domain import Chunk
from ragserve.engines.local.blend import Blender
from ragserve.engines.local.kv_store import KVStore
from ragserve.engines.local.segments import segment_call
from ragserve.synthesis import answer_call

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
# The knobs a verdict holds for: a verdict measured with other selection settings says
# nothing about these (the ratio is what the gate chooses, the rest do not change KV).
SELECTION_FIELDS = ("mode", "check_layers", "deviation", "sink_tokens", "boundary_tokens", "deviation_mass")


@dataclass(frozen=True)
class GateThresholds:
    """A ratio passes when, over the sampled prompts, both hold."""

    max_kl: float = 0.2
    """Mean first-token KL(full prefill || blend), nats."""
    min_first_token_agreement: float = 0.8
    """Share of prompts whose greedy first token equals full prefill's."""


@dataclass(frozen=True)
class GatePoint:
    ratio: float
    kl: float                      # mean over prompts
    first_token_agreement: float
    passed: bool


@dataclass(frozen=True)
class GateVerdict:
    model_id: str
    collection: str
    selection: dict[str, Any]      # SELECTION_FIELDS of the BlendConfig it was measured with
    num_prompts: int
    thresholds: GateThresholds
    points: tuple[GatePoint, ...]  # ascending ratio
    ratio: float | None            # the smallest ratio that passed; None: blending refused
    created_unix: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateVerdict":
        return cls(model_id=d["model_id"], collection=d["collection"], selection=dict(d["selection"]),
                   num_prompts=int(d["num_prompts"]), thresholds=GateThresholds(**d["thresholds"]),
                   points=tuple(GatePoint(**p) for p in d["points"]),
                   ratio=None if d["ratio"] is None else float(d["ratio"]), created_unix=float(d["created_unix"]))


@dataclass(frozen=True)
class BlendPolicy:
    """What the engine does with one collection's calls."""

    blend: bool
    ratio: float                   # when blending
    source: str                    # "gate" (a stored verdict) | "config" (never checked)
    reason: str = ""               # why blending is refused, for logs and the decision JSON

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection(config: BlendConfig) -> dict[str, Any]:
    return {name: list(v) if isinstance(v := getattr(config, name), tuple) else v for name in SELECTION_FIELDS}


def meta_name(collection: str) -> str:
    return f"gate.{collection}"


def generated_question(chunk: Chunk) -> str:
    """A plain question about a chunk, when the user gives none: its title or opening words."""
    subject = chunk.title.strip() or " ".join(chunk.text.split()[:8])
    return f"What does the context say about {subject}?"


def sample_prompts(chunks: Sequence[Chunk], questions: Sequence[str], num_prompts: int,
                   chunks_per_prompt: int, seed: int = 0) -> list[tuple[str, list[Chunk]]]:
    """(question, chunks) pairs: random groups of the collection's chunks; a generated
    question asks about one of the group's chunks unless `questions` are given (cycled)."""
    if not chunks:
        raise ValueError("the blend gate needs at least one chunk")
    rng = random.Random(seed)
    k = min(chunks_per_prompt, len(chunks))
    out = []
    for i in range(num_prompts):
        group = rng.sample(list(chunks), k)
        out.append((questions[i % len(questions)] if questions else generated_question(rng.choice(group)), group))
    return out


def check(blender: Blender, tokenizer: Any, collection: str, chunks: Sequence[Chunk],
          config: BlendConfig, questions: Sequence[str] = (), ratios: Sequence[float] = DEFAULT_RATIOS,
          thresholds: GateThresholds = GateThresholds(), num_prompts: int = 8, chunks_per_prompt: int = 4,
          seed: int = 0) -> GateVerdict:
    """Blend vs full prefill on sampled prompts at every ratio; the verdict (not saved)."""
    ratios = sorted(set(ratios))
    kls: dict[float, list[float]] = {r: [] for r in ratios}
    agree: dict[float, list[bool]] = {r: [] for r in ratios}
    num = 0
    for question, group in sample_prompts(chunks, questions, num_prompts, chunks_per_prompt, seed):
        prompt = segment_call(tokenizer, answer_call(question, group, max_tokens=1))
        if prompt is None:
            continue
        ref = torch.log_softmax(blender.full(prompt).logits, -1)
        reused, _ = blender.gather(prompt)
        for r in ratios:
            logp = torch.log_softmax(blender.blend(prompt, replace(config, ratio=r), reused.clone()).logits, -1)
            kls[r].append(float((ref.exp() * (ref - logp)).sum()))
            agree[r].append(int(logp.argmax()) == int(ref.argmax()))
        num += 1
    if num == 0:
        raise ValueError(f"no sampled prompt of collection {collection!r} is in the blendable answer layout")
    points = []
    for r in ratios:
        kl, ag = sum(kls[r]) / num, sum(agree[r]) / num
        points.append(GatePoint(r, round(kl, 5), round(ag, 4),
                                kl <= thresholds.max_kl and ag >= thresholds.min_first_token_agreement))
    chosen = next((p.ratio for p in points if p.passed), None)
    return GateVerdict(blender.store.spec.model_id, collection, selection(config), num, thresholds,
                       tuple(points), chosen)


def save_verdict(store: KVStore, verdict: GateVerdict) -> str:
    return str(store.write_meta(meta_name(verdict.collection), verdict.to_dict()))


def load_verdict(store: KVStore, collection: str) -> GateVerdict | None:
    record = store.read_meta(meta_name(collection))
    if record is None:
        return None
    try:
        return GateVerdict.from_dict(record)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("blend gate: ignoring malformed verdict for %r (%s); rerun `ragserve blend check`",
                       collection, exc)
        return None


def describe(verdict: GateVerdict) -> str:
    best = min(verdict.points, key=lambda p: p.kl)
    return (f"no ratio in {[p.ratio for p in verdict.points]} passed (best: ratio {best.ratio}, first-token KL "
            f"{best.kl} > {verdict.thresholds.max_kl} or agreement {best.first_token_agreement} < "
            f"{verdict.thresholds.min_first_token_agreement}, over {verdict.num_prompts} prompts)")


class BlendGate:
    """Per-collection blend policies from the verdicts stored beside the KV. Thread-safe;
    each collection's verdict is read once (`forget` re-reads after a new check)."""

    def __init__(self, store: KVStore, config: BlendConfig) -> None:
        self.store = store
        self.config = config
        self._policies: dict[str, BlendPolicy] = {}
        self._lock = threading.Lock()

    def policy(self, collection: str) -> BlendPolicy:
        with self._lock:
            cached = self._policies.get(collection)
        if cached is not None:
            return cached
        policy = self._resolve(collection)
        with self._lock:
            self._policies[collection] = policy
        return policy

    def forget(self, collection: str | None = None) -> None:
        with self._lock:
            if collection is None:
                self._policies.clear()
            else:
                self._policies.pop(collection, None)

    def policies(self) -> dict[str, dict[str, Any]]:
        """Every policy resolved so far (the HTTP stats)."""
        with self._lock:
            return {name: p.to_dict() for name, p in self._policies.items()}

    def _resolve(self, collection: str) -> BlendPolicy:
        default = BlendPolicy(True, self.config.ratio, "config")
        if not collection:
            return default
        verdict = load_verdict(self.store, collection)
        if verdict is None:
            return default
        if verdict.selection != selection(self.config):
            logger.warning("blend gate: the verdict for %r was measured with %s, not the configured %s; "
                           "using blend.ratio=%s (rerun `ragserve blend check --collection %s`)", collection,
                           verdict.selection, selection(self.config), self.config.ratio, collection)
            return default
        if verdict.ratio is None:
            policy = BlendPolicy(False, self.config.ratio, "gate", f"blend gate refused: {describe(verdict)}")
            logger.warning("blending refused for model %s, collection %r: %s", verdict.model_id, collection,
                           describe(verdict))
            return policy
        logger.info("blend gate: collection %r blends at ratio %s (passed over %d prompts)", collection,
                    verdict.ratio, verdict.num_prompts)
        return BlendPolicy(True, verdict.ratio, "gate")
