"""Every prompt ragserve sends, in one place. Synthesis programs format these.

A prompt over passages is its user message as structure (`domain.PromptContext`): a head,
the passages ("[n] title\ntext", separated by PASSAGE_SEPARATOR), the separator, a tail.
`render_context` is the only place that turns it into text; engines that reuse chunk KV
(CacheBlend, LMCache) lay prompts out from the same structure and these helpers.
"""
from __future__ import annotations

from typing import Any

SYSTEM = ("You are a precise assistant. Answer the question using only the given context. "
          "Reply with the shortest answer: a name, number, date or short phrase copied from the "
          "context, on one line, with no explanation.")

# Query-focused summaries (qmsum-style questions): prose, several lines allowed.
SYSTEM_SUMMARY = ("You are a precise assistant. Answer the question using only the given context. "
                  "Reply with a short summary of two to four sentences in plain prose, with no preamble.")
ANSWER_SYSTEMS = {"short": SYSTEM, "summary": SYSTEM_SUMMARY}   # synthesis.answer_style -> system prompt

PASSAGE_SEPARATOR = "\n\n"   # between passages, and between the last one and the tail

# Each template is (head, tail) around its passages; the tail formats with the question.
# stuff / reduce: one call over all passages (or summaries). CacheBlend reuses this layout.
ANSWER = ("Context:\n", "Question: {question}\nAnswer:")

# map_rerank: one call per passage; confidence comes from the answer's token log-probs.
MAP_RERANK = ("Context:\n", "Question: {question}\n"
              "If the context does not contain the answer, reply exactly: unknown\nAnswer:")
UNKNOWN = "unknown"

# map_reduce, map step.
MAP_SYSTEM = "You extract facts from a passage. Be brief and factual."
MAP_SUMMARY = ("Passage:\n", "Question: {question}\n"
               "Write the facts from the passage that help answer the question, in at most {words} words. "
               "If the passage has nothing relevant, reply exactly: none\nFacts:")
NONE = "none"

# refine: sequential passes (the head formats with the question and the current answer).
REFINE = ("Question: {question}\nCurrent answer: {answer}\n\nNew context:\n",
          "Improve the current answer using the new context if it helps; otherwise repeat the current "
          "answer. Reply with the answer only.\nAnswer:")


def passage_marker(n: int) -> str:
    """A passage's rank in its prompt: the one part of it that changes with its position."""
    return f"[{n}]"


def passage_text(title: str, text: str) -> str:
    """A chunk as prompts show it, without its rank: the same at any position."""
    return f"{title}\n{text}" if title else text

# The instruction text a small model may echo after its answer ("1988 a date or short phrase
# copied from the context, ..."): synthesis.clean_answer cuts an answer where it starts
# repeating one of these.
INSTRUCTIONS = (SYSTEM, SYSTEM_SUMMARY, MAP_RERANK, MAP_SUMMARY, MAP_SYSTEM, REFINE)


def format_passage(n: int, title: str, text: str) -> str:
    return f"{passage_marker(n)} {passage_text(title, text)}"


def render_context(context: Any) -> str:
    """The user message of a `domain.PromptContext`."""
    passages = PASSAGE_SEPARATOR.join(format_passage(i + 1, p.title, p.text)
                                      for i, p in enumerate(context.passages))
    return context.head + passages + PASSAGE_SEPARATOR + context.tail
