"""Profiler feedback loop (METIS §5): every N queries, answer one query with the golden
(most expensive) plan, ask the profiler which profile it should have given, and keep the
last few answers as few-shot examples in the profiler's prompt.

Who owns what: this module is pure bookkeeping and prompt building. MetisPlanner runs
the golden plan in the background (through the scheduler, like any query), runs the
review call on the profiler's engine, and hands the result back:

    if loop.record_query():                      # after each profiled query
        plan = loop.golden_plan(max_chunks, fits)   # map_reduce:30:300, or the most chunks that fit
        answer = ...run plan...
        call = loop.review_call(builder, query, answer, profile_used, plan)
        loop.add_result(query, (await engine.generate([call]))[0])
    run_llm_profiler(engine, builder, q, examples=loop.examples)
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from ragserve.domain import LLMCall, LLMResult, Method, RagPlan
from ragserve.errors import ConfigError
from ragserve.metis.llm_profiler import ProfilePromptBuilder, parse_profile
from ragserve.metis.profile import FeedbackExample, QueryProfile

logger = logging.getLogger(__name__)

GOLDEN_PLAN = RagPlan(Method.MAP_REDUCE, 30, 300)
_MAX_ANSWER_CHARS = 1200   # the golden answer shown to the profiler is cut to this


class FeedbackLoop:
    def __init__(self, every_n: int = 30, keep: int = 4, golden: RagPlan = GOLDEN_PLAN) -> None:
        if every_n < 1 or keep < 1:
            raise ConfigError(f"feedback every_n={every_n} and keep={keep} must be >= 1")
        self.every_n = every_n
        self.golden = golden
        self.num_queries = 0
        self._examples: deque[FeedbackExample] = deque(maxlen=keep)

    def record_query(self) -> bool:
        """Count one served query; True when this one should also run the golden plan."""
        self.num_queries += 1
        return self.num_queries % self.every_n == 0

    def golden_plan(self, max_chunks: int, fits: Callable[[RagPlan], bool] = lambda plan: True
                    ) -> RagPlan | None:
        """The most expensive plan that `fits` (the model's context and the engine's KV): the
        golden plan with as many of its chunks as fit, at most `max_chunks` (what the collection
        returned). None when not even one chunk fits. METIS' golden plan (30 chunks, 300-token
        summaries) prices above an 8k context; a golden run that never fits never teaches."""
        def plan(n: int) -> RagPlan:
            return RagPlan(self.golden.method, n, self.golden.intermediate_tokens)

        lo, hi = 1, max(1, min(self.golden.num_chunks, max_chunks))
        if not fits(plan(lo)):
            return None
        while lo < hi:   # invariant: plan(lo) fits; cost grows with the chunks
            mid = (lo + hi + 1) // 2
            if fits(plan(mid)):
                lo = mid
            else:
                hi = mid - 1
        return plan(lo)

    def review_call(self, builder: ProfilePromptBuilder, query: str, golden_answer: str,
                    used: QueryProfile, plan: RagPlan | None = None) -> LLMCall:
        """Ask the profiler which profile it should have given, knowing the best answer
        (`plan` is the golden plan that ran; default the configured one)."""
        plan = plan or self.golden
        review = (
            f"{builder.user_turn(query)}\n\n"
            f"You profiled this question as {used.to_json()}.\n"
            f"The most thorough pipeline ({plan.method.value} over {plan.num_chunks} passages) "
            f"answered:\n{golden_answer.strip()[:_MAX_ANSWER_CHARS]}\n\n"
            "Given that answer, which profile should you have given so that the cheapest "
            "pipeline still finds it? Reply with only the JSON object.")
        turns = builder.messages(query)[:-1] + (("user", review),)
        return LLMCall(messages=turns, max_tokens=builder.max_tokens, temperature=0.0,
                       stop=("}",), logprobs=True, tag="feedback")

    def add_result(self, query: str, result: LLMResult) -> FeedbackExample | None:
        """Parse the review answer and keep it as an example; None if it was not a profile."""
        profile = parse_profile(result)
        if profile is None:
            logger.warning("feedback review gave no valid profile; example not kept")
            return None
        example = FeedbackExample(query, profile)
        self._examples.append(example)
        logger.info("feedback example kept: %s (%d of %d)", profile, len(self._examples),
                    self._examples.maxlen)
        return example

    @property
    def examples(self) -> tuple[FeedbackExample, ...]:
        """The last `keep` examples, oldest first (the order the prompt shows them)."""
        return tuple(self._examples)
