"""METIS as the controller's planner: profile -> prune -> best-fit schedule under free KV.

Owns one Scheduler (per engine) and one PlanPruner per collection (the confidence gate's
history is per collection). A query's KV stays reserved from admission until `done`:
its calls reach the engine over several rounds (map, then reduce), so the engine's own
snapshot lags behind what was promised. Free KV for a decision is therefore
capacity - max(engine used, reserved by us).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ragserve import prompts
from ragserve.config import Config
from ragserve.controller import Decision, PlannerStats, run_program
from ragserve.domain import EngineStats, LLMCall, PlanDecision, RagPlan, RetrievedChunk
from ragserve.engines.base import Engine
from ragserve.metis.cost import CostConfig, CostModel
from ragserve.metis.feedback import FeedbackLoop
from ragserve.metis.llm_profiler import SEED_EXAMPLES, ProfilePromptBuilder, run_llm_profiler
from ragserve.metis.profile import MAX_PIECES, LearnedProfiler, QueryProfile
from ragserve.metis.rules import PlanPruner, PlannerRules
from ragserve.metis.scheduler import Job, Policy, Scheduler, SchedulerConfig
from ragserve.synthesis import build_program

logger = logging.getLogger(__name__)

PUMP_INTERVAL_S = 0.02   # re-check waiting queries this often: engine calls finish on their own

# Tokens of the synthesis instructions around the question and the passages of one call
# (prompts.py), on top of the chat template measured on the engine: 45-68 tokens in
# SmolLM2's and Qwen's tokenizers (refine's, which also carries the previous answer, 87).
INSTRUCTION_TOKENS = 60


@dataclass(frozen=True)
class PlannerSetup:
    """What every planner over one engine shares: METIS and the AdaptiveRAG* baseline
    (ragserve.eval.systems) prune with the same rules and price with the same cost model."""

    rules: PlannerRules
    cost: CostModel         # for engine.model, its context capped at engine.max_context_tokens
    max_chunks_needed: int  # chunks to retrieve: the most the rules give a 10-piece profile

    @classmethod
    def build(cls, engine: Engine, config: Config) -> "PlannerSetup":
        rules = PlannerRules.from_config(config.metis)
        probe = LLMCall((("system", "x"), ("user", "x")), 1)
        template = max(0, engine.prompt_tokens(probe) - 2)   # the chat template around two 1-token turns
        model = replace(engine.model, max_context=min(engine.model.max_context, config.engine.max_context_tokens))
        syn = config.synthesis
        cost = CostModel(model, CostConfig(answer_tokens=syn.answer_tokens,
                                           default_intermediate_tokens=syn.default_intermediate_tokens,
                                           overhead_tokens_per_call=template + INSTRUCTION_TOKENS,
                                           blend_prefill_fraction=blend_fraction(config),
                                           blend_min_tokens=config.blend.min_tokens))
        return cls(rules, cost, int(MAX_PIECES * rules.max_chunks_factor))


def llm_profiler_engine(config: Config, engine: Engine) -> Any:
    """Where the LLM profiler runs: `metis.profiler_endpoint` when set (an OpenAI-compatible
    server, e.g. a larger model on vLLM), else the serving engine. Close it if it is not `engine`."""
    if config.metis.profiler_endpoint is None:
        return engine
    from ragserve.engines.vllm.endpoint import EndpointGenerator

    return EndpointGenerator(config.metis.profiler_endpoint, config.vllm)



@dataclass
class _Pending:
    job: Job
    future: asyncio.Future


class MetisPlanner:
    """Implements the controller's `QueryPlanner` protocol."""

    def __init__(self, engine: Engine, config: Config, learned: LearnedProfiler | None = None,
                 profiler: Any = None) -> None:
        self.engine = engine
        self.config = config
        mc = config.metis
        setup = PlannerSetup.build(engine, config)
        self.rules, self.cost, self.max_chunks_needed = setup.rules, setup.cost, setup.max_chunks_needed
        # The LLM profiler's engine (profile and feedback-review calls only).
        self.profiler = profiler or (engine if learned is not None else llm_profiler_engine(config, engine))
        self.scheduler = Scheduler(SchedulerConfig(policy=Policy(mc.policy), max_waiting=mc.max_waiting,
                                                   retry_after_s=config.server.retry_after_s,
                                                   hold_until_release=True), self.cost,
                                   kv_capacity_tokens=engine.stats().kv_capacity_tokens)
        self.learned = learned
        # Golden runs only teach the LLM profiler (few-shot examples); a learned profiler never
        # reads them, so with one they would be pure load on the engine.
        every = mc.feedback_every if learned is None else 0
        self.feedback = FeedbackLoop(every_n=every or 10**9)
        self._planners: dict[str, PlanPruner] = {}
        self._builders: dict[str, ProfilePromptBuilder] = {}
        self._tokenizer_verdicts: dict[tuple[str, str], bool] = {}
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._pump_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # -- QueryPlanner protocol ---------------------------------------------------------------
    async def decide(self, question: str, collection: Any, hits: list[RetrievedChunk],
                     slo_s: float | None = None) -> Decision:
        t0 = time.perf_counter()
        profile = await self._profile(collection, question)
        profile_s = time.perf_counter() - t0
        planner = self._planners.setdefault(collection.name, PlanPruner(self.rules))
        space = planner.plan(profile, len(hits))
        counts, question_tokens = await self._token_counts(collection, hits, question)
        self.retime()
        job = Job.from_space(f"q{next(self._ids)}", space, counts, question_tokens, slo_s=slo_s,
                             blend_fraction=collection_blend_fraction(self.engine, collection.name))
        decision = await self._admit(job)
        if self.feedback.record_query():
            self._spawn(self._golden_run(question, collection, hits, profile))
        chosen = PlanDecision(decision.plan, decision.reason.value, profile, space.plans, space.fallback,
                              space.from_history, decision.kv_free_tokens, decision.cost, planner="metis",
                              admission_s=decision.wait_s)
        return Decision(chosen, queue_s=decision.wait_s, profile_s=profile_s, job_id=job.id)

    def done(self, decision: Decision) -> None:
        if decision.job_id:
            self.scheduler.release(decision.job_id)
            self._kick()

    # -- pieces -------------------------------------------------------------------------
    async def _profile(self, collection: Any, question: str) -> QueryProfile:
        if self.learned is not None:
            return self.learned.profile(question)
        examples = self.feedback.examples or SEED_EXAMPLES
        return await run_llm_profiler(self.profiler, self._builder(collection), question, examples)

    def _builder(self, collection: Any) -> ProfilePromptBuilder:
        return profile_builder(self._builders, self.config, collection)

    async def _token_counts(self, collection: Any, hits: list[RetrievedChunk], question: str
                            ) -> tuple[list[int], int]:
        return await prompt_token_counts(self.engine, collection, hits, question,
                                         self.cost.config.overhead_tokens_per_chunk, self._tokenizer_verdicts)

    def retime(self) -> EngineStats:
        """Price the next job's candidates at the engine's measured speed and running batch
        now; returns the snapshot used."""
        stats = self.engine.stats()
        self.scheduler.cost_model = self.cost.timed(stats.speeds, stats.num_running)
        return stats

    def effective_stats(self) -> EngineStats:
        stats = self.engine.stats()
        held = self.scheduler.held_tokens
        # Scheduler frees = (capacity - used') - held; used' makes that capacity - max(used, held).
        return replace(stats, kv_used_tokens=max(0, stats.kv_used_tokens - held))

    def stats(self) -> PlannerStats:
        counters = self.scheduler.counters()
        return PlannerStats(num_waiting=self.scheduler.num_waiting, held_tokens=self.scheduler.held_tokens,
                            kv_free_tokens=self.effective_stats().kv_free_tokens, plans=counters["plans"],
                            reasons=counters["reasons"])

    async def _admit(self, job: Job):
        future = asyncio.get_running_loop().create_future()
        self.scheduler.add(job)   # raises NoFeasiblePlan / AdmissionRejected
        self._pending[job.id] = _Pending(job, future)
        self._step()
        if not future.done() and (self._pump_task is None or self._pump_task.done()):
            self._pump_task = asyncio.ensure_future(self._pump())
        try:
            return await future
        except asyncio.CancelledError:
            if not self.scheduler.cancel(job.id):
                self.scheduler.release(job.id)
            self._pending.pop(job.id, None)
            raise

    def _step(self) -> None:
        for d in self.scheduler.schedule(self.effective_stats()):
            p = self._pending.pop(d.job.id, None)
            if p is not None and not p.future.done():
                p.future.set_result(d)
            elif p is None or p.future.done():
                self.scheduler.release(d.job.id)
        for job, error in self.scheduler.take_infeasible():
            p = self._pending.pop(job.id, None)
            if p is not None and not p.future.done():
                p.future.set_exception(error)

    def _kick(self) -> None:
        if self._pending:
            self._step()

    async def _pump(self) -> None:
        while self._pending:
            await asyncio.sleep(PUMP_INTERVAL_S)
            self._step()

    # -- feedback (METIS §5) ------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _golden_run(self, question: str, collection: Any, hits: list[RetrievedChunk],
                          used: QueryProfile) -> None:
        """Answer with the most expensive plan that fits, then ask the profiler what it should
        have said. Skipped (logged) when that plan does not fit the free KV right now: it is
        admitted at once or not at all, so it never takes a fallback's KV from user queries."""
        try:
            counts, question_tokens = await self._token_counts(collection, hits, question)
            capacity = min(self.cost.model.max_context, self.scheduler.kv_capacity_tokens or self.cost.model.max_context)

            def fits(plan: RagPlan) -> bool:
                c = self.cost.estimate(plan, counts, question_tokens)
                return c.max_call_tokens <= self.cost.model.max_context and c.kv_budget_tokens <= capacity

            golden = self.feedback.golden_plan(len(hits), fits)
            if golden is None:
                logger.info("feedback: no golden plan fits (%s with one chunk is too large); skipped",
                            self.feedback.golden.method.value)
                return
            need = self.cost.estimate(golden, counts, question_tokens).kv_budget_tokens
            free = self.effective_stats().kv_free_tokens
            if self.scheduler.num_waiting or need > free:
                logger.info("feedback: golden plan %s skipped: needs %d KV tokens, %d free, %d queries waiting",
                            golden, need, free, self.scheduler.num_waiting)
                return
            job = Job(f"golden{next(self._ids)}", (golden,), golden.method, tuple(counts), question_tokens,
                      arrival_s=time.monotonic(),
                      blend_fraction=collection_blend_fraction(self.engine, collection.name))
            admitted = await self._admit(job)
            try:
                logger.info("feedback: golden run of %s (%s) for a query profiled %s", admitted.plan,
                            admitted.reason.value, used)
                program = build_program(question, [h.chunk for h in hits], admitted.plan, self.config.synthesis)
                run = await run_program(self.engine, program)
            finally:
                self.done(Decision(PlanDecision(admitted.plan), job_id=job.id))
            call = self.feedback.review_call(self._builder(collection), question, run.answer, used, admitted.plan)
            (result,) = await self.profiler.generate([call])
            example = self.feedback.add_result(question, result)
            logger.info("feedback: golden plan %s -> example %s", admitted.plan,
                        example.profile.to_json() if example else None)
        except Exception:   # feedback is best effort; never fail user queries for it
            logger.exception("feedback golden run failed")

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._pump_task:
            self._pump_task.cancel()
        if self.profiler is not self.engine:
            await self.profiler.close()


def blend_fraction(config: Config) -> float:
    """Share of a stuff call's chunk tokens the embedded engine prefills: blend.ratio when
    CacheBlend is on (the reused rest costs a KV load, not compute), else all of them."""
    if config.blend.enabled and config.engine.backend == "local":
        return max(config.blend.ratio, 0.01)
    return 1.0


def collection_blend_fraction(engine: Any, collection: str) -> float | None:
    """What the engine's blend gate prefills of a stuff call's chunk tokens for `collection`:
    the ratio that passed, or all of them when the gate refused blending (priced at
    blend.ratio, a refused collection's stuff plans would look several times cheaper than
    they run). None: the engine has no gate (blending off, or vLLM); `blend_fraction(config)`
    holds."""
    policy_of = getattr(engine, "blend_policy", None)
    policy = policy_of(collection) if policy_of is not None else None
    if policy is None:
        return None
    return max(policy.ratio, 0.01) if policy.blend else 1.0


TOKENIZER_PROBE_CHUNKS = 3   # chunks counted again to tell whether the engine tokenizes as the collection did


def counts_match(engine: Any, hits: Sequence[RetrievedChunk]) -> bool:
    """Does the engine count chunk texts as the collection's tokenizer did at ingest? Told by
    the tokenizer's behaviour, not by names: the engine counts the first few hits again, and
    the stored counts hold exactly when every one agrees. Different tokenizers disagree on a
    passage of a few hundred tokens; the same tokenizer under another model name (vLLM's
    --served-model-name, a hub id vs a local copy) agrees."""
    sample = [h.chunk for h in hits[:TOKENIZER_PROBE_CHUNKS] if h.chunk.text]
    return bool(sample) and all(engine.count_tokens(c.text) == c.num_tokens for c in sample)


def chunk_prompt_tokens(engine: Any, collection: Any, hits: list[RetrievedChunk], header_allowance: int,
                        *, same_tokenizer: bool | None = None) -> list[int]:
    """Each hit's prompt tokens beyond the cost model's per-chunk allowance: its text plus the
    part of its passage header ("[n] title") the allowance does not cover. qmsum/financebench
    titles take ~20 tokens; without this a plan priced just under the engine's limit fails there.
    Stored chunk counts are used when `same_tokenizer` (None = `counts_match` decides)."""
    if same_tokenizer is None:
        same_tokenizer = counts_match(engine, hits)
    headers: dict[str, int] = {}
    out = []
    for h in hits:
        title = h.chunk.title or ""
        if title not in headers:
            headers[title] = engine.count_tokens(prompts.format_passage(1, title, "") + prompts.PASSAGE_SEPARATOR)
        text = h.chunk.num_tokens if same_tokenizer else engine.count_tokens(h.chunk.text)
        out.append(text + max(0, headers[title] - header_allowance))
    return out


async def prompt_token_counts(engine: Any, collection: Any, hits: list[RetrievedChunk], question: str,
                              header_allowance: int, verdicts: dict[tuple[str, str], bool] | None = None
                              ) -> tuple[list[int], int]:
    """`chunk_prompt_tokens` and the question's tokens, counted in a worker thread: token
    counts are synchronous, and a vLLM engine counts over HTTP (/tokenize). `verdicts`
    remembers `counts_match` per collection and ingest tokenizer."""
    def count() -> tuple[list[int], int]:
        key = (str(collection.name), str(collection.spec.tokenizer))
        same = verdicts.get(key) if verdicts is not None else None
        if same is None:
            same = counts_match(engine, hits)
            if verdicts is not None:
                verdicts[key] = same
        return (chunk_prompt_tokens(engine, collection, hits, header_allowance, same_tokenizer=same),
                engine.count_tokens(question))

    return await asyncio.to_thread(count)


def profile_builder(cache: dict[str, ProfilePromptBuilder], config: Config, collection: Any
                    ) -> ProfilePromptBuilder:
    """The collection's profiler prompt builder, made once: configured description or `describe`."""
    b = cache.get(collection.name)
    if b is None:
        desc = config.metis.descriptions.get(collection.name) or describe(collection)
        b = cache[collection.name] = ProfilePromptBuilder(desc, collection.spec.chunk_tokens)
    return b


def describe(collection: Any) -> str:
    """A one-line description from the collection's titles (METIS gives its profiler one line)."""
    titles: list[str] = []
    for chunk in collection.iter_chunks():
        if chunk.title and chunk.title not in titles:
            titles.append(chunk.title)
        if len(titles) >= 5:
            break
    sample = ", ".join(t.replace("_", " ") for t in titles)
    return (f"{collection.num_documents} documents" + (f" such as: {sample}" if sample else "")
            + f"; {len(collection)} chunks")
