"""The embedded engine with the real SmolLM2 model: batching, budget, streaming, stats."""
from __future__ import annotations

import asyncio

import pytest

from ragserve.config import EngineConfig
from ragserve.domain import LLMCall
from ragserve.errors import BadInput

pytestmark = pytest.mark.model

SYSTEM = ("system", "Answer the question using the context. Reply with a short answer.")
CONTEXT = ("The 1973 oil crisis began in October 1973 when OAPEC proclaimed an oil embargo. "
           "By March 1974 the price of oil had risen from US$3 per barrel to nearly $12.")
QUESTIONS = ["When did the oil crisis begin?", "What was the price of oil by March 1974?",
             "Who proclaimed the embargo?", "What did the price rise from?"]


def call(question: str, max_tokens: int = 12, **kw) -> LLMCall:
    return LLMCall(messages=(SYSTEM, ("user", f"Context: {CONTEXT}\n\nQuestion: {question}")),
                   max_tokens=max_tokens, **kw)


def test_batched_calls_match_sequential_greedy(smollm2_engine):
    calls = [call(q) for q in QUESTIONS]

    async def run():
        batched = await smollm2_engine.generate(calls)
        sequential = [(await smollm2_engine.generate([c]))[0] for c in calls]
        return batched, sequential

    batched, sequential = asyncio.run(run())
    for b, s in zip(batched, sequential):
        assert b.text and b.output_tokens > 0
        # Left padding must not change the math: same greedy tokens batched or alone.
        assert b.text == s.text
    assert [r.prompt_tokens for r in batched] == [smollm2_engine.prompt_tokens(c) for c in calls]


def test_token_counts_and_timings(smollm2_engine):
    (r,) = asyncio.run(smollm2_engine.generate([call(QUESTIONS[0], max_tokens=5, logprobs=True)]))
    assert r.output_tokens <= 5
    assert len(r.token_logprobs) == r.output_tokens
    assert all(lp <= 0 for lp in r.token_logprobs)
    assert 0 <= r.queue_s <= r.ttft_s <= r.total_s
    assert r.finish_reason in ("stop", "length")


def test_stop_string_cuts_output(smollm2_engine):
    (free,) = asyncio.run(smollm2_engine.generate([call(QUESTIONS[0], max_tokens=20)]))
    words = free.text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    (cut,) = asyncio.run(smollm2_engine.generate([call(QUESTIONS[0], max_tokens=20, stop=(stop,))]))
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_streaming_yields_the_same_text(smollm2_engine):
    async def run():
        pieces = [p async for p in smollm2_engine.stream(call(QUESTIONS[1]))]
        (whole,) = await smollm2_engine.generate([call(QUESTIONS[1])])
        return pieces, whole

    pieces, whole = asyncio.run(run())
    assert len(pieces) > 1
    assert "".join(pieces).strip() == whole.text


def test_stats_idle(smollm2_engine):
    stats = smollm2_engine.stats()
    assert stats.kv_capacity_tokens == int(512 * 2**20 // smollm2_engine.model.kv_bytes_per_token)
    assert stats.kv_used_tokens == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_bytes_per_token == 2 * 30 * 3 * 64 * smollm2_engine.model.dtype_bytes


def test_budget_makes_calls_wait_and_none_is_dropped(smollm2_engine):
    from ragserve.engines.local.engine import LocalEngine

    probe = call(QUESTIONS[0], max_tokens=8)
    # Room for exactly one call at a time: the rest must queue, then all finish.
    one = (smollm2_engine.prompt_tokens(probe) + 8) * smollm2_engine.model.kv_bytes_per_token
    engine = LocalEngine(EngineConfig(model="smollm2", kv_budget_mb=1.4 * one / 2**20))
    need = engine.prompt_tokens(probe) + 8
    assert need <= engine.kv_capacity_tokens < 2 * need
    seen = []

    async def run():
        task = asyncio.ensure_future(engine.generate([call(q, max_tokens=8) for q in QUESTIONS]))
        while not task.done():
            seen.append(engine.stats())
            await asyncio.sleep(0.01)
        return await task

    try:
        results = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert len(results) == 4 and all(r.text for r in results)
    assert max(s.num_waiting for s in seen) >= 2
    assert max(s.num_running for s in seen) == 1
    assert all(s.kv_used_tokens <= s.kv_capacity_tokens for s in seen)
    assert results[-1].queue_s > results[0].queue_s


def test_call_larger_than_budget_is_rejected_with_numbers():
    from ragserve.engines.local.engine import LocalEngine

    engine = LocalEngine(EngineConfig(model="smollm2", kv_budget_mb=0.5))
    try:
        with pytest.raises(BadInput, match=r"above the engine limit of \d+ tokens"):
            asyncio.run(engine.generate([call(QUESTIONS[0], max_tokens=200)]))
    finally:
        asyncio.run(engine.close())


def test_model_is_called_with_the_current_cache_argument(smollm2_engine, monkeypatch):
    """transformers 5 renamed `past_key_values` to `cache` (the old name warns on every run)."""
    model = smollm2_engine.runner.model
    seen: list[str] = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.extend(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    asyncio.run(smollm2_engine.generate([call(QUESTIONS[0], max_tokens=3)]))
    assert "cache" in seen and "past_key_values" not in seen


def test_prefills_admitted_while_a_call_decodes_are_measured_as_its_pause():
    from ragserve.engines.local.engine import LocalEngine

    engine = LocalEngine(EngineConfig(model="smollm2"))
    long_call = LLMCall(messages=(("user", "Count from 1 to 200, separated by commas."),), max_tokens=48)

    async def run():
        first = asyncio.ensure_future(engine.generate([long_call]))
        while engine.stats().speeds.num_steps < 2:   # it is decoding now
            await asyncio.sleep(0.005)
        late = engine.generate([call(q, max_tokens=2) for q in QUESTIONS])
        return await asyncio.gather(first, late)

    try:
        (long_result,), _ = asyncio.run(run())
        speeds = engine.stats().speeds
    finally:
        asyncio.run(engine.close())
    assert long_result.output_tokens > 8   # still decoding when the late calls were prefilled
    assert speeds.prefill_pause_s > 0
