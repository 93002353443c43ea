"""The LLM profiler: METIS' profiling prompt, its parser and the async glue (§4.1).

Everything but the engine call is pure:

    ProfilePromptBuilder.build(query, examples) -> LLMCall     (pure)
    engine.generate([call])                      -> LLMResult   (I/O, the profiler's engine)
    parse_profile(result)                        -> QueryProfile | None  (pure)

`run_llm_profiler` is the small async glue (one retry, then `fallback_profile()`); it
awaits a duck-typed engine and imports none. Feedback examples (METIS §5) come from
`ragserve.metis.feedback` and are rendered here as few-shot turns.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ragserve.domain import LLMCall, LLMResult
from ragserve.errors import EngineUnavailable
from ragserve.metis.profile import (MAX_PIECES, MAX_SUMMARY, MIN_PIECES, MIN_SUMMARY, Complexity, FeedbackExample,
                                    ProfileSource, QueryProfile, fallback_profile)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- prompt

_SYSTEM = (
    "You profile questions for a retrieval-augmented question answering system. "
    "Reply with one JSON object and nothing else, with exactly these keys:\n"
    '{"complexity": "high" or "low", "joint_reasoning": true or false, '
    '"pieces": integer 1-10, "summary_range": [min, max]}\n'
    '- complexity: "high" if answering needs analysis or explanation (why, how, compare, '
    'summarize); "low" for a direct fact lookup.\n'
    "- joint_reasoning: true if the answer must combine information from several passages; "
    "false if a single passage is enough.\n"
    "- pieces: how many separate pieces of information the answer needs.\n"
    "- summary_range: how many words (between 30 and 200) a summary of each passage "
    "must keep to answer the question."
)
_RETRY = ("That was not a valid profile. Reply with only the JSON object with the keys "
          "complexity, joint_reasoning, pieces and summary_range.")


@dataclass(frozen=True)
class ProfilePromptBuilder:
    """Builds the profiler's LLMCall from what METIS gives its profiler: the query, a one-line
    collection description and the chunk size. Nothing else (no chunks, no model identity)."""

    collection_description: str   # one line, e.g. "Fortune 500 quarterly reports, 2023"
    chunk_tokens: int             # chunk size in the serving model's tokens
    max_tokens: int = 80          # the JSON object is ~35 tokens
    tag: str = "profile"

    def user_turn(self, query: str) -> str:
        return (f"Collection: {self.collection_description}\n"
                f"Chunk size: {self.chunk_tokens} tokens\nQuestion: {query}")

    def messages(self, query: str, examples: Sequence[FeedbackExample] = ()
                 ) -> tuple[tuple[str, str], ...]:
        turns: list[tuple[str, str]] = [("system", _SYSTEM)]
        for ex in examples:   # feedback (METIS §5) as few-shot turns, oldest first
            turns += [("user", self.user_turn(ex.query)), ("assistant", ex.profile.to_json())]
        turns.append(("user", self.user_turn(query)))
        return tuple(turns)

    def build(self, query: str, examples: Sequence[FeedbackExample] = ()) -> LLMCall:
        """Greedy, with log-probs (confidence) and a stop at the object's closing brace."""
        return LLMCall(messages=self.messages(query, examples), max_tokens=self.max_tokens,
                       temperature=0.0, stop=("}",), logprobs=True, tag=self.tag)

    def build_retry(self, call: LLMCall, bad_text: str) -> LLMCall:
        """Decoding is greedy, so a retry must change the prompt: show the bad answer and ask
        again for the bare object."""
        turns = call.messages + (("assistant", bad_text.strip()[:400]), ("user", _RETRY))
        return LLMCall(messages=turns, max_tokens=call.max_tokens, temperature=0.0,
                       stop=call.stop, logprobs=True, tag=call.tag)


# ---------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[a-zA-Z]*")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_PY_LITERALS = ((r"\bTrue\b", "true"), (r"\bFalse\b", "false"), (r"\bNone\b", "null"))
_KEY_VALUE = re.compile(
    r"""["']?([A-Za-z][A-Za-z _-]{2,40}?)["']?\s*[:=]\s*"""
    r"""(\[[^\]]*\]?|"[^"]*"|'[^']*'|[^,\n}]+)""")
_INT = re.compile(r"-?\d+(?:\.\d+)?")
_TRUE_WORDS = {"yes", "y", "true", "1", "required", "needed", "necessary"}
_FALSE_WORDS = {"no", "n", "false", "0", "not", "none", "unnecessary"}


def _json_object_text(text: str) -> str | None:
    """The first {...} in `text`, closed if the output stopped early (a `}` stop string)."""
    text = _FENCE.sub("", text)
    start = text.find("{")
    if start < 0:
        return None
    depth, in_str, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return text[start:].rstrip().rstrip(",") + "}"


def _loads_lenient(obj_text: str) -> dict[str, Any] | None:
    candidates = [obj_text]
    fixed = _TRAILING_COMMA.sub(r"\1", obj_text)
    for pattern, repl in _PY_LITERALS:
        fixed = re.sub(pattern, repl, fixed)
    candidates += [fixed, fixed.replace("'", '"')]
    for cand in candidates:
        try:
            value = json.loads(cand)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _key_values(text: str) -> dict[str, Any]:
    """Last resort for non-JSON answers such as 'Complexity: High\\nJoint reasoning: Yes'."""
    return {m.group(1): m.group(2).strip().strip("\"'") for m in _KEY_VALUE.finditer(text)}


def _field(key: str) -> str | None:
    k = re.sub(r"[^a-z]+", "_", key.lower()).strip("_")
    if "summary" in k or "length" in k or "range" in k:
        return "summary_range"
    if "complex" in k:
        return "complexity"
    if "joint" in k or "reason" in k:
        return "joint_reasoning"
    if "piece" in k or k in {"n", "num_info", "information", "num_information"}:
        return "pieces"
    return None


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return [float(x) for x in _INT.findall(str(value))]


def _complexity(value: Any) -> Complexity | None:
    word = str(value).strip().lower()
    if word.startswith(("h", "complex", "hard")):
        return Complexity.HIGH
    if word.startswith(("l", "simple", "easy")):
        return Complexity.LOW
    return None


def _joint(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    words = re.findall(r"[a-z0-9]+", str(value).lower())
    if not words:
        return None
    if words[0] in _TRUE_WORDS:
        return True
    if words[0] in _FALSE_WORDS:
        return False
    return None


def _pieces(value: Any) -> int | None:
    nums = _numbers(value)
    if not nums or not math.isfinite(nums[0]):
        return None
    return min(MAX_PIECES, max(MIN_PIECES, round(nums[0])))


def _summary_range(value: Any) -> tuple[int, int] | None:
    nums = [n for n in _numbers(value)[:2] if math.isfinite(n)]
    if not nums:
        return None
    clamped = sorted(min(MAX_SUMMARY, max(MIN_SUMMARY, round(abs(n)))) for n in nums)
    return clamped[0], clamped[-1]


def confidence_from_logprobs(token_logprobs: Sequence[float]) -> float | None:
    """exp(mean log-prob) of the output tokens: the geometric-mean token probability.

    Why not the min over the JSON *value* tokens: `LLMResult` carries log-probs without token
    strings, so value tokens cannot be located without the engine's tokenizer, and a min
    over all tokens is dominated by incidental formatting tokens (spacing, quotes) that do
    not change the profile. The schema is fixed, so the share of near-certain format tokens
    is about the same for every query and the 0.9 threshold keeps one meaning across
    queries. None when the engine returned no log-probs.
    """
    if not token_logprobs:
        return None
    mean = sum(token_logprobs) / len(token_logprobs)
    return min(1.0, max(0.0, math.exp(mean)))


def parse_profile(result: LLMResult, *, confidence_if_missing: float = 1.0
                  ) -> QueryProfile | None:
    """Extract and validate a profile from a profiler's output; None if it has none.

    Tolerates code fences, text around the object, a missing closing brace (the `}` stop),
    single quotes, trailing commas, Python literals, "High"/"Yes" variants, key spellings
    like "Joint reasoning needed", and plain "key: value" lines. complexity, joint_reasoning
    and pieces are required; pieces is clamped to 1-10; summary_range is ordered and clamped
    to 30-200 and defaults to the whole range when missing. An engine that returns no
    log-probs cannot be gated: the profile then gets `confidence_if_missing`.
    """
    text = result.text or ""
    obj_text = _json_object_text(text)
    raw = _loads_lenient(obj_text) if obj_text is not None else None
    if raw is None:
        raw = _key_values(text)
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = _field(str(key))
        if name is not None and name not in fields:
            fields[name] = value
    complexity = _complexity(fields["complexity"]) if "complexity" in fields else None
    joint = _joint(fields["joint_reasoning"]) if "joint_reasoning" in fields else None
    pieces = _pieces(fields["pieces"]) if "pieces" in fields else None
    if complexity is None or joint is None or pieces is None:
        return None
    summary = _summary_range(fields.get("summary_range")) or (MIN_SUMMARY, MAX_SUMMARY)
    confidence = confidence_from_logprobs(result.token_logprobs)
    return QueryProfile(complexity, joint, pieces, summary,
                        confidence=confidence_if_missing if confidence is None else confidence,
                        source=ProfileSource.LLM)


# ---------------------------------------------------------------------------- async glue

class _GeneratingEngine(Protocol):
    async def generate(self, calls: Sequence[LLMCall]) -> list[LLMResult]:
        ...


async def run_llm_profiler(engine: _GeneratingEngine, builder: ProfilePromptBuilder,
                           query: str, examples: Sequence[FeedbackExample] = (),
                           *, max_attempts: int = 2) -> QueryProfile:
    """Profile `query` on `engine` (any object with `generate`): one retry, then fallback.

    An unreachable engine (`EngineUnavailable`) also yields the fallback profile: a profile
    is advice, the query can still be answered. Other engine errors propagate.
    """
    call = builder.build(query, examples)
    for attempt in range(1, max_attempts + 1):
        try:
            (result,) = await engine.generate([call])
        except EngineUnavailable as exc:
            logger.warning("profiler engine unavailable (%s); using the fallback profile", exc)
            return fallback_profile()
        profile = parse_profile(result)
        if profile is not None:
            return profile
        logger.debug("profiler attempt %d gave no valid profile (%d chars)",
                     attempt, len(result.text))
        call = builder.build_retry(call, result.text)
    logger.warning("profiler gave no valid profile in %d attempts; using the fallback profile",
                   max_attempts)
    return fallback_profile()


# Seed few-shot examples, used until the feedback loop has produced its own (METIS §5
# keeps the last 4). They span the three rule outcomes so small profilers see the contrast.
SEED_EXAMPLES: tuple[FeedbackExample, ...] = (
    FeedbackExample("Who wrote the novel Dracula?",
                    QueryProfile(Complexity.LOW, False, 1, (30, 50))),
    FeedbackExample("Which film came out first, The Fog or Halloween II?",
                    QueryProfile(Complexity.LOW, True, 2, (30, 60))),
    FeedbackExample("Why did the company's operating margin fall in 2022, and how did management respond?",
                    QueryProfile(Complexity.HIGH, True, 4, (80, 150))),
)
