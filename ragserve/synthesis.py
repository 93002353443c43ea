"""Synthesis programs: how a plan turns (question, chunks) into LLM calls and an answer.

A program is a generator: it yields a batch of `LLMCall`s (a fan-out is one batch),
receives their `LLMResult`s, and finally returns the answer text. The controller
drives it against an engine; tests can drive it with canned results. No I/O here.

    stuff       1 call over all chunks
    map_rerank  N calls (one batch), keep the most confident non-"unknown" answer
    map_reduce  N summary calls (one batch, capped at intermediate_tokens), then 1 answer call
    refine      N sequential calls, each improving the previous answer
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Generator, Sequence

from ragserve import prompts
from ragserve.config import SynthesisConfig
from ragserve.domain import Chunk, LLMCall, LLMResult, Method, Passage, PromptContext, RagPlan

Program = Generator[list[LLMCall], list[LLMResult], str]

_WORDS_PER_TOKEN = 0.75   # English averages ~1.3 tokens per word


@dataclass(frozen=True)
class Candidate:
    """A map_rerank answer with its confidence (geometric-mean token probability)."""

    text: str
    confidence: float


def _context(head: str, chunks: Sequence[Chunk], tail: str) -> PromptContext:
    return PromptContext(head, tuple(Passage(c.id, c.title, c.text) for c in chunks), tail)


def _call(system: str, context: PromptContext, max_tokens: int, **kwargs) -> LLMCall:
    """The call's user message is rendered from `context`, which travels with it."""
    return LLMCall((("system", system), ("user", prompts.render_context(context))), max_tokens,
                   context=context, **kwargs)


def answer_call(question: str, chunks: Sequence[Chunk], max_tokens: int, tag: str = "stuff",
                stop: tuple[str, ...] = (), steer: bool | None = None, system: str = prompts.SYSTEM) -> LLMCall:
    head, tail = prompts.ANSWER
    return _call(system, _context(head, chunks, tail.format(question=question)), max_tokens, stop=stop,
                 tag=tag, steer=steer)


def map_rerank_call(question: str, chunk: Chunk, max_tokens: int, stop: tuple[str, ...] = (),
                    steer: bool | None = None, system: str = prompts.SYSTEM) -> LLMCall:
    head, tail = prompts.MAP_RERANK
    return _call(system, _context(head, [chunk], tail.format(question=question)), max_tokens, stop=stop,
                 logprobs=True, tag="map_rerank", steer=steer)


def map_summary_call(question: str, chunk: Chunk, max_tokens: int) -> LLMCall:
    words = max(5, int(max_tokens * _WORDS_PER_TOKEN))
    head, tail = prompts.MAP_SUMMARY
    return _call(prompts.MAP_SYSTEM, _context(head, [chunk], tail.format(question=question, words=words)),
                 max_tokens, tag="map")


def refine_call(question: str, answer: str, chunk: Chunk, max_tokens: int, stop: tuple[str, ...] = (),
                system: str = prompts.SYSTEM) -> LLMCall:
    head, tail = prompts.REFINE
    return _call(system, _context(head.format(question=question, answer=answer), [chunk], tail), max_tokens,
                 stop=stop, tag="refine")


_WORD_RE = re.compile(r"[a-z0-9]+")
_ARTICLES = {"a", "an", "the"}


def _ngrams(n: int) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for item in prompts.INSTRUCTIONS:
        # a template is (head, tail) around the passages; its words are what an answer may echo
        text = " ".join(item) if isinstance(item, tuple) else item
        words = _WORD_RE.findall(text.lower())
        out.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


_ECHO4, _ECHO3 = _ngrams(4), _ngrams(3)


def _echo_start(words: list[str]) -> int | None:
    """Index of the word where an echoed instruction begins, None when there is none: four
    consecutive instruction words anywhere (widened back over 3-word overlaps and an
    article), or three or more that run to the end of the answer."""
    for i in range(len(words) - 3):
        if tuple(words[i:i + 4]) in _ECHO4:
            while i > 0 and tuple(words[i - 1:i + 2]) in _ECHO3:
                i -= 1
            return i - 1 if i > 0 and words[i - 1] in _ARTICLES else i
    for i in range(len(words) - 2):
        if all(tuple(words[j:j + 3]) in _ECHO3 for j in range(i, len(words) - 2)):
            return i
    return None


def clean_answer(text: str) -> str:
    """`text` cut where it starts repeating a prompt instruction, stripped. Small models
    (SmolLM2) continue a short answer with the system prompt's wording."""
    matches = list(_WORD_RE.finditer(text.lower()))
    start = _echo_start([m.group() for m in matches])
    if start is None:
        return text.strip()
    return text[: matches[start].start()].strip().rstrip(",;:-").strip()


def _is(text: str, word: str) -> bool:
    return text.strip().strip(".").lower() == word


def confidence(result: LLMResult) -> float:
    if not result.token_logprobs or _is(result.text, prompts.UNKNOWN) or not result.text.strip():
        return 0.0
    return math.exp(sum(result.token_logprobs) / len(result.token_logprobs))


def pick_best(results: Sequence[LLMResult]) -> Candidate:
    """Most confident answer; ties keep retrieval order. All unknown -> 'unknown'."""
    best = Candidate(prompts.UNKNOWN, 0.0)
    for r in results:
        text = clean_answer(r.text)
        c = confidence(r) if text and not _is(text, prompts.UNKNOWN) else 0.0
        if c > best.confidence:
            best = Candidate(text, c)
    return best


@dataclass(frozen=True)
class _Answer:
    """How every answer-writing call of one program is made."""

    max_tokens: int
    stop: tuple[str, ...]
    system: str
    steer: bool | None


def batch_shape(plan: RagPlan) -> tuple[int, ...]:
    """Calls per engine submission of `plan`'s program, in order (the programs below): what
    runs together. The cost model prices rounds and calls from it."""
    n = plan.num_chunks
    if plan.method is Method.STUFF:
        return (1,)
    if plan.method is Method.MAP_RERANK:
        return (n,)
    if plan.method is Method.MAP_REDUCE:
        return (n, 1)
    return (1,) * n   # refine


def answer_batch(plan: RagPlan, num_chunks: int) -> int | None:
    """Index of the batch of `plan`'s program that holds the answering call, when that call
    is alone in its batch (it can stream); None for map_rerank, which picks its answer among
    a fan-out."""
    if plan.method is Method.MAP_RERANK:   # even over one chunk: its answer may become "unknown"
        return None
    return len(batch_shape(RagPlan(plan.method, num_chunks, plan.intermediate_tokens))) - 1


def build_program(question: str, chunks: Sequence[Chunk], plan: RagPlan, config: SynthesisConfig,
                  steer: bool | None = None) -> Program:
    """`steer` (LLMSteer) goes on the calls that read passages in the answer layout (stuff,
    map_rerank, reduce, first refine step); None leaves the engine's default."""
    chunks = list(chunks)[: plan.num_chunks]
    if not chunks:
        raise ValueError("a synthesis program needs at least one chunk")
    inter = plan.intermediate_tokens or config.default_intermediate_tokens
    ans = _Answer(config.answer_tokens, tuple(config.answer_stop), prompts.ANSWER_SYSTEMS[config.answer_style], steer)
    if plan.method is Method.STUFF:
        return _stuff(question, chunks, ans)
    if plan.method is Method.MAP_RERANK:
        return _map_rerank(question, chunks, ans)
    if plan.method is Method.MAP_REDUCE:
        return _map_reduce(question, chunks, inter, ans)
    return _refine(question, chunks, inter, ans)


def _stuff(question: str, chunks: list[Chunk], ans: _Answer) -> Program:
    (result,) = yield [answer_call(question, chunks, ans.max_tokens, stop=ans.stop, steer=ans.steer, system=ans.system)]
    return clean_answer(result.text)


def _map_rerank(question: str, chunks: list[Chunk], ans: _Answer) -> Program:
    results = yield [map_rerank_call(question, c, ans.max_tokens, ans.stop, ans.steer, ans.system) for c in chunks]
    return pick_best(results).text


def _map_reduce(question: str, chunks: list[Chunk], inter: int, ans: _Answer) -> Program:
    summaries = yield [map_summary_call(question, c, inter) for c in chunks]
    kept = [Chunk(id=c.id + "/summary", doc_id=c.doc_id, text=s.text, num_tokens=s.output_tokens, title=c.title)
            for c, s in zip(chunks, summaries) if s.text.strip() and not _is(s.text, prompts.NONE)]
    if not kept:   # nothing relevant anywhere: answer from the raw top chunk rather than from nothing
        kept = chunks[:1]
    (result,) = yield [answer_call(question, kept, ans.max_tokens, tag="reduce", stop=ans.stop, steer=ans.steer,
                                   system=ans.system)]
    return clean_answer(result.text)


def _refine(question: str, chunks: list[Chunk], inter: int, ans: _Answer) -> Program:
    # Intermediate answers are capped at `inter`; the last pass at the answer length.
    first_cap = ans.max_tokens if len(chunks) == 1 else inter
    (result,) = yield [answer_call(question, chunks[:1], first_cap, tag="refine", stop=ans.stop, steer=ans.steer,
                                   system=ans.system)]
    answer = clean_answer(result.text)
    for i, chunk in enumerate(chunks[1:], start=2):
        cap = ans.max_tokens if i == len(chunks) else inter
        (result,) = yield [refine_call(question, answer, chunk, cap, ans.stop, ans.system)]
        answer = clean_answer(result.text) or answer
    return answer
