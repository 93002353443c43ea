"""Every prompt ragserve sends, in one place. Synthesis programs format these."""
from __future__ import annotations

SYSTEM = ("You are a precise assistant. Answer the question using only the given context. "
          "Reply with the shortest answer: a name, number, date or short phrase copied from the "
          "context, on one line, with no explanation.")

# Query-focused summaries (qmsum-style questions): prose, several lines allowed.
SYSTEM_SUMMARY = ("You are a precise assistant. Answer the question using only the given context. "
                  "Reply with a short summary of two to four sentences in plain prose, with no preamble.")
ANSWER_SYSTEMS = {"short": SYSTEM, "summary": SYSTEM_SUMMARY}   # synthesis.answer_style -> system prompt

# stuff / reduce: one call over all passages (or summaries).
ANSWER = "Context:\n{context}\n\nQuestion: {question}\nAnswer:"

# map_rerank: one call per passage; confidence comes from the answer's token log-probs.
MAP_RERANK = ("Context:\n{context}\n\nQuestion: {question}\n"
              "If the context does not contain the answer, reply exactly: unknown\nAnswer:")
UNKNOWN = "unknown"

# map_reduce, map step.
MAP_SYSTEM = "You extract facts from a passage. Be brief and factual."
MAP_SUMMARY = ("Passage:\n{context}\n\nQuestion: {question}\n"
               "Write the facts from the passage that help answer the question, in at most {words} words. "
               "If the passage has nothing relevant, reply exactly: none\nFacts:")
NONE = "none"

# refine: sequential passes.
REFINE = ("Question: {question}\nCurrent answer: {answer}\n\nNew context:\n{context}\n\n"
          "Improve the current answer using the new context if it helps; otherwise repeat the current "
          "answer. Reply with the answer only.\nAnswer:")

PASSAGE = "[{n}] {title}{text}"

# The instruction text a small model may echo after its answer ("1988 a date or short phrase
# copied from the context, ..."): synthesis.clean_answer cuts an answer where it starts
# repeating one of these.
INSTRUCTIONS = (SYSTEM, SYSTEM_SUMMARY, MAP_RERANK, MAP_SUMMARY, MAP_SYSTEM, REFINE)


def format_passage(n: int, title: str, text: str) -> str:
    return PASSAGE.format(n=n, title=f"{title}\n" if title else "", text=text)
