"""Factories for the pure core's tests: models, load snapshots, profiles, jobs, results.

Token arithmetic in the tests uses `make_cost_model()`: overhead 20 tokens per call, 0 per chunk,
answers 30 tokens, intermediate default 50, prefill 2000 tok/s, decode 20 tok/s, 2% buffer.
"""
from __future__ import annotations

from typing import Sequence

from ragserve.domain import EngineStats, LLMResult, Method, ModelSpec, RagPlan
from ragserve.metis.cost import CostConfig, CostModel
from ragserve.metis.profile import Complexity, ProfileSource, QueryProfile
from ragserve.metis.scheduler import Job, Policy, Scheduler, SchedulerConfig

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, bf16 -> 2*30*3*64*2 = 23,040 B/token.
SMOLLM2 = ModelSpec("smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64,
                    dtype_bytes=2, max_context=8192)
# Qwen2.5-0.5B: 24 layers, 2 KV heads, head_dim 64, bf16 -> 12,288 B/token.
QWEN = ModelSpec("qwen2.5-0.5b", num_layers=24, num_kv_heads=2, head_dim=64,
                 dtype_bytes=2, max_context=32768)

QUESTION_TOKENS = 10


def make_model_spec(name: str = "smollm2", **overrides) -> ModelSpec:
    base = {"smollm2": SMOLLM2, "qwen": QWEN}[name]
    if not overrides:
        return base
    values = {**base.__dict__, **overrides}
    return ModelSpec(**values)


def make_cost_model(model: ModelSpec | None = None, **overrides) -> CostModel:
    cfg = {"overhead_tokens_per_call": 20, "overhead_tokens_per_chunk": 0, "answer_tokens": 30,
           "default_intermediate_tokens": 50, "prefill_tok_s": 2000.0, "decode_tok_s": 20.0,
           "kv_buffer": 0.02, **overrides}
    return CostModel(model or SMOLLM2, CostConfig(**cfg))


def make_stats(free: int, capacity: int = 100_000, num_running: int = 0,
               num_waiting: int = 0) -> EngineStats:
    """A snapshot with exactly `free` KV tokens free."""
    assert 0 <= free <= capacity
    return EngineStats(kv_capacity_tokens=capacity, kv_used_tokens=capacity - free,
                       num_running=num_running, num_waiting=num_waiting,
                       kv_bytes_per_token=SMOLLM2.kv_bytes_per_token)


def make_profile(complexity: str = "high", joint: bool = True, pieces: int = 3,
                 summary: tuple[int, int] = (30, 100), confidence: float = 1.0,
                 source: ProfileSource = ProfileSource.LLM) -> QueryProfile:
    return QueryProfile(Complexity(complexity), joint, pieces, summary, confidence, source)


def stuff_plans(lo: int, hi: int, method: Method = Method.STUFF, inter: int = 0) -> tuple[RagPlan, ...]:
    return tuple(RagPlan(method, n, inter) for n in range(lo, hi + 1))


def make_job(job_id: str = "q0", plans: Sequence[RagPlan] | None = None,
             fallback: Method = Method.STUFF, chunk_tokens: int | Sequence[int] = 100,
             num_chunks: int = 30, question_tokens: int = QUESTION_TOKENS,
             slo_s: float | None = None, arrival_s: float = 0.0) -> Job:
    """Default: pruned {stuff:5..10} over 30 retrieved chunks of 100 tokens."""
    counts = ((chunk_tokens,) * num_chunks if isinstance(chunk_tokens, int)
              else tuple(chunk_tokens))
    return Job(job_id, tuple(plans) if plans is not None else stuff_plans(5, 10), fallback,
               counts, question_tokens, slo_s=slo_s, arrival_s=arrival_s)


def make_scheduler(policy: str = "fcfs", cost_model: CostModel | None = None,
                   kv_capacity_tokens: int | None = None, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(policy=Policy(policy), **config),
                     cost_model or make_cost_model(), kv_capacity_tokens=kv_capacity_tokens)


def budget(plan: RagPlan, job: Job | None = None, cost_model: CostModel | None = None) -> int:
    """KV budget (tokens, with buffer) of `plan` for `job` (default job)."""
    job = job or make_job()
    return (cost_model or make_cost_model()).estimate(
        plan, job.chunk_token_counts, job.question_tokens).kv_budget_tokens


def make_result(text: str, logprobs: Sequence[float] = ()) -> LLMResult:
    return LLMResult(text=text, prompt_tokens=100, output_tokens=max(1, len(logprobs)),
                     ttft_s=0.01, total_s=0.1, token_logprobs=tuple(logprobs))
