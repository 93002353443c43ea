"""Cost model: what a plan costs in KV memory, calls and time, before it runs (METIS §4.3).

Who owns what: the planner proposes plans; this module prices them from the *real* token
counts of the retrieved chunks (ranked, so a plan with n chunks uses the first n); the
scheduler compares the price with the engine's free KV. Pure arithmetic, no engine.

Per-call accounting (q = question tokens, o = template/instruction overhead per call,
c_i = chunk i plus its passage header, A = answer cap, I = intermediate cap; mirrors
`ragserve.synthesis`, whose `batch_shape` gives the calls and rounds). An engine reserves
prompt + max_tokens for every running call, so KV is counted the same way:

    stuff       1 call   prompt q+o+sum(c)            out A   peak = prompt + A
    map_rerank  n calls  prompt q+o+c_i               out A   peak = sum over the fan-out
    map_reduce  n maps   prompt q+o+c_i               out I   (submitted together)
                1 reduce prompt q+o+n*I               out A   peak = max(maps, reduce)
    refine      n calls  prompt q+o+c_i (+I after #1) out I   sequential: peak = largest call
                                                      (the last call: out A)

`kv_budget_tokens` adds METIS' 2% buffer against OOM; it is what must fit the free KV.
Time (`est_latency_s`, the plan's own service time on the engine): per sequential round,
prefill(sum of the round's prompts) + expected output of the round x decode step time at the
batch it decodes in (the rows already running plus the round's calls). With measured
`EngineSpeeds` (from the engine's stats) prefill rate, step time and the expected output per
call tag are the engine's recent figures; without them the config's prior rates and the
output caps (a worst case). Outputs feed the next round at their expected length too.
Every decode step adds the engine's measured `EngineSpeeds.prefill_pause_s`: under load the
embedded engine pauses its running batch for each prefill it admits.
With CacheBlend a stuff call prefills only `blend_prefill_fraction` of its chunk tokens (the
KV held is unchanged), so its estimated latency drops and an SLO admits larger stuff plans.
A query may carry its own fraction (`blend_fraction=`): the engine's blend gate decides per
collection, and a collection it refuses is prefilled whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

from ragserve.config import SynthesisConfig
from ragserve.domain import EngineSpeeds, Method, ModelSpec, RagPlan
from ragserve.errors import BadInput, ConfigError
from ragserve.synthesis import batch_shape

# Enum member lookups are slow on the class; the pricing loop compares against these.
_STUFF, _MAP_RERANK, _MAP_REDUCE, _REFINE = (Method.STUFF, Method.MAP_RERANK, Method.MAP_REDUCE,
                                             Method.REFINE)


@dataclass(frozen=True)
class CostConfig:
    overhead_tokens_per_call: int = 48
    """Chat template + instructions around the question and chunks, per call. The planner
    measures the template on the engine (metis.planner.PlannerSetup)."""
    overhead_tokens_per_chunk: int = 8
    """Passage header ("[n] title") and separator around each chunk or summary in a prompt;
    set 0 when the chunk token counts passed in already include it."""
    answer_tokens: int = SynthesisConfig.answer_tokens
    """max_tokens of a call that writes an answer (stuff, map_rerank maps, reduce, last refine)."""
    default_intermediate_tokens: int = SynthesisConfig.default_intermediate_tokens
    """Intermediate cap when a map_reduce/refine plan gives none."""
    prefill_tok_s: float = 2000.0
    """Prior prompt tokens per second, used until the engine has measured its own."""
    decode_tok_s: float = 20.0
    """Prior decode steps per second at batch 1, used until the engine has measured its own."""
    kv_buffer: float = 0.02
    """Safety margin on the KV estimate (METIS: 2%)."""
    blend_prefill_fraction: float = 1.0
    """Share of a stuff prompt's chunk tokens that is prefilled. CacheBlend (blend.enabled)
    reuses stored chunk KV and recomputes only blend.ratio of it: the KV held is the same,
    the prefill work and time shrink. 1.0 = no blending."""
    blend_min_tokens: int = 0
    """The engine blends a stuff call only when its chunks hold at least this many tokens
    (blend.min_tokens); a smaller one is prefilled whole and priced so."""

    def __post_init__(self) -> None:
        for name in ("overhead_tokens_per_call", "overhead_tokens_per_chunk", "answer_tokens",
                     "default_intermediate_tokens", "blend_min_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cost {name}={getattr(self, name)} must be >= 0")
        if self.prefill_tok_s <= 0 or self.decode_tok_s <= 0:
            raise ConfigError(f"cost rates prefill_tok_s={self.prefill_tok_s} "
                              f"decode_tok_s={self.decode_tok_s} must be > 0")
        if not 0 < self.blend_prefill_fraction <= 1:
            raise ConfigError(f"cost blend_prefill_fraction={self.blend_prefill_fraction} must be in (0, 1]")
        if not 0 <= self.kv_buffer < 1:
            raise ConfigError(f"cost kv_buffer={self.kv_buffer} must be in [0, 1)")


class PlanCost(NamedTuple):
    """The price of one plan for one query.

    A NamedTuple rather than a frozen dataclass: immutable and named all the same, but the
    scheduler builds hundreds per query and a frozen dataclass costs ~3x more to construct.
    """

    prompt_tokens: int      # sum of prompt tokens over all calls (prefill work)
    output_tokens: int      # sum of max output tokens over all calls
    kv_tokens: int          # peak KV tokens resident at once (prompt + max_tokens per call)
    kv_budget_tokens: int   # kv_tokens + buffer: what must fit the engine's free KV
    kv_bytes: int           # kv_budget_tokens * model bytes per token
    max_call_tokens: int    # the largest single call (prompt + max output): vs max_context
    num_calls: int
    num_rounds: int         # sequential phases (stuff 1, map_* 1-2, refine n)
    est_latency_s: float
    prefill_tokens: int     # prompt tokens actually prefilled (< prompt_tokens when blended)

    def to_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = self._asdict()
        out["est_latency_s"] = round(self.est_latency_s, 4)
        return out


class CostModel:
    def __init__(self, model: ModelSpec, config: CostConfig | None = None,
                 speeds: EngineSpeeds | None = None, running_rows: int = 0) -> None:
        """`speeds`: the engine's measured speeds (None: the config's priors and output caps);
        `running_rows`: calls already decoding, which every new round's steps share."""
        self.model = model
        self.config = config or CostConfig()
        self.bytes_per_token = model.kv_bytes_per_token
        self.speeds = speeds or prior_speeds(self.config)
        self.measured = speeds is not None
        self.running_rows = running_rows

    def timed(self, speeds: EngineSpeeds | None, running_rows: int = 0) -> "CostModel":
        """A copy that prices time with `speeds` (an engine stats snapshot's) at `running_rows`."""
        return CostModel(self.model, self.config, speeds, running_rows)

    def calibrated(self, *, prefill_tok_s: float | None = None,
                   decode_tok_s: float | None = None) -> "CostModel":
        """A copy with the given rates (None keeps the current one)."""
        s = self.speeds
        step = 1.0 / decode_tok_s if decode_tok_s else s.step_base_s
        speeds = replace(s, prefill_tok_s=prefill_tok_s or s.prefill_tok_s, step_base_s=step,
                         step_per_row_s=s.step_per_row_s * step / s.step_base_s)
        return CostModel(self.model, self.config, speeds, self.running_rows)

    def estimate(self, plan: RagPlan, chunk_token_counts: Sequence[int], question_tokens: int,
                 *, overhead_tokens_per_call: int | None = None,
                 answer_tokens: int | None = None, blend_fraction: float | None = None) -> PlanCost:
        """Price `plan` using the first `plan.num_chunks` of the ranked chunk token counts."""
        return self.estimate_many([plan], chunk_token_counts, question_tokens,
                                  overhead_tokens_per_call=overhead_tokens_per_call,
                                  answer_tokens=answer_tokens, blend_fraction=blend_fraction)[0]

    def estimate_many(self, plans: Sequence[RagPlan], chunk_token_counts: Sequence[int],
                      question_tokens: int, *, overhead_tokens_per_call: int | None = None,
                      answer_tokens: int | None = None, blend_fraction: float | None = None
                      ) -> list[PlanCost]:
        """`estimate` for several plans of one query, sharing one prefix-sum pass over the
        chunks (the scheduler prices every candidate of a job at once). `blend_fraction`
        overrides `blend_prefill_fraction` for this query (None keeps it)."""
        cfg = self.config
        base = question_tokens + (cfg.overhead_tokens_per_call if overhead_tokens_per_call is None
                                  else overhead_tokens_per_call)
        ans = cfg.answer_tokens if answer_tokens is None else answer_tokens
        frac = cfg.blend_prefill_fraction if blend_fraction is None else blend_fraction
        if not 0 < frac <= 1:
            raise BadInput(f"blend_fraction={frac} must be in (0, 1]")
        chunks = _RankedChunks(chunk_token_counts, cfg.overhead_tokens_per_chunk)
        return [self._estimate(plan, chunks, base, ans, frac) for plan in plans]

    def _estimate(self, plan: RagPlan, chunks: "_RankedChunks", base: int, ans: int, blend: float) -> PlanCost:
        n = plan.num_chunks
        if not 1 <= n <= len(chunks.counts):
            raise BadInput(f"plan {plan} needs {n} chunks; {len(chunks.counts)} retrieved")
        cfg = self.config
        inter = plan.intermediate_tokens or cfg.default_intermediate_tokens
        total_chunks, largest = chunks.total[n], chunks.largest[n]
        method = plan.method
        sp, rows = self.speeds, self.running_rows
        rate = sp.prefill_tok_s
        # Straight-line per method (the scheduler prices hundreds of plans per query).
        if method is _STUFF:
            prompt = base + total_chunks
            kv = max_call = prompt + ans
            output = ans
            # blended: the chunks' stored KV is reused, only a share of it recomputed
            frac = blend if total_chunks >= cfg.blend_min_tokens else 1.0
            work = base + math.ceil(total_chunks * frac)
            latency = work / rate + sp.decode_s(sp.expected_output("stuff", ans), rows + 1)
        elif method is _MAP_RERANK:
            prompt = n * base + total_chunks
            kv = prompt + n * ans                       # the fan-out is resident together
            max_call = base + largest + ans
            output = n * ans
            # one batch: it decodes until its longest answer ends
            latency = prompt / rate + sp.decode_s(sp.expected_output("map_rerank", ans), rows + n)
        elif method is _MAP_REDUCE:
            maps = n * base + total_chunks
            reduce_prompt = base + n * (inter + chunks.per_chunk)   # summaries, as passages
            kv = max(maps + n * inter, reduce_prompt + ans)
            max_call = max(base + largest + inter, reduce_prompt + ans)
            prompt = maps + reduce_prompt
            output = n * inter + ans
            summary = sp.expected_output("map", inter)
            reduce_work = reduce_prompt - n * (inter - summary)   # summaries at their expected length
            latency = (maps / rate + sp.decode_s(summary, rows + n)
                       + reduce_work / rate + sp.decode_s(sp.expected_output("reduce", ans), rows + 1))
        elif method is _REFINE:
            # each call sees the previous answer (capped at I); the last one writes the answer
            outs = [inter] * (n - 1) + [ans]
            prompts = [base + c + (inter if i else 0) for i, c in enumerate(chunks.counts[:n])]
            kv = max_call = max(p + o for p, o in zip(prompts, outs))
            prompt = sum(prompts)
            output = sum(outs)
            mid = sp.expected_output("refine", inter)
            last = sp.expected_output("refine", ans)
            latency = prompt / rate + sp.decode_s((n - 1) * mid + last, rows + 1)
        else:  # pragma: no cover - Method is closed
            raise AssertionError(method)
        if method is not _STUFF:
            work = prompt
        shape = batch_shape(plan)   # the program's engine submissions (ragserve.synthesis owns them)
        num_calls, num_rounds = sum(shape), len(shape)
        budget = math.ceil(round(kv * (1.0 + cfg.kv_buffer), 6))  # round: 100*1.02 != 102.0
        return PlanCost(prompt, output, kv, budget, budget * self.bytes_per_token, max_call,
                        num_calls, num_rounds, latency, work)


def prior_speeds(config: CostConfig) -> EngineSpeeds:
    """Speeds from the config's prior rates, before any measurement: outputs at their caps."""
    step = 1.0 / config.decode_tok_s
    return EngineSpeeds(config.prefill_tok_s, step, 0.0)


class _RankedChunks:
    """Chunk sizes (with passage headers) and their prefix sums / maxima: O(1) per plan."""

    __slots__ = ("counts", "per_chunk", "total", "largest")

    def __init__(self, counts: Sequence[int], per_chunk: int) -> None:
        self.per_chunk = per_chunk
        self.counts = [c + per_chunk for c in counts]
        self.total = [0]     # total[n] = sum of the first n
        self.largest = [0]   # largest[n] = max of the first n
        for c in self.counts:
            self.total.append(self.total[-1] + c)
            self.largest.append(max(self.largest[-1], c))
