"""Systems: parsing the --systems/--grid lists, availability, and the AdaptiveRAG* planner."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ragserve.config import Config, EngineConfig, MetisConfig, VllmConfig, VllmEndpoint
from ragserve.domain import Chunk, EngineStats, RetrievedChunk
from ragserve.errors import BadInput
from ragserve.eval.systems import (DEFAULT_FIXED_GRID, AdaptivePlanner, parse_grid, parse_systems, system_config,
                                   unavailable_reason)
from ragserve.metis.planner import MetisPlanner, chunk_prompt_tokens
from ragserve.metis.profile import Complexity, ProfileSource, QueryProfile
from tests.metis.factories import SMOLLM2


def test_parse_systems_expands_the_fixed_grid():
    systems = parse_systems("fixed,adaptive,metis", parse_grid("stuff:2,map_reduce:6:64"))
    assert [s.name for s in systems] == ["fixed:stuff:2", "fixed:map_reduce:6:64", "adaptive", "metis"]
    assert systems[0].plan is not None and systems[2].plan is None
    assert [s.name for s in parse_systems("fixed:map_rerank:3,metis+blend")] == ["fixed:map_rerank:3", "metis+blend"]
    assert len(parse_systems("fixed")) == len(DEFAULT_FIXED_GRID) == len(parse_grid(None))
    for bad in ("metis,metis", "magic", ""):
        with pytest.raises(BadInput):
            parse_systems(bad)
    with pytest.raises(BadInput):
        parse_grid("stuff")


def test_blend_availability_and_config():
    blend = parse_systems("metis+blend")[0]
    assert unavailable_reason(blend, Config()) is None
    assert system_config(blend, Config()).blend.enabled
    vllm = Config(engine=EngineConfig(backend="vllm"),
                  vllm=VllmConfig(endpoints=(VllmEndpoint("http://x", "m"),)))
    assert "unavailable" in unavailable_reason(blend, vllm)
    lmcache = replace(vllm, vllm=VllmConfig(endpoints=(VllmEndpoint("http://x", "m", lmcache_blend=True),)))
    assert unavailable_reason(blend, lmcache) is None
    assert unavailable_reason(parse_systems("metis")[0], vllm) is None
    tuned, tuned_blend = parse_systems("tuned,tuned+blend")
    assert tuned.tuned and tuned_blend.tuned and tuned_blend.blend and not tuned.blend
    assert system_config(tuned_blend, Config()).blend.enabled and not system_config(tuned, Config()).blend.enabled
    assert "unavailable" in unavailable_reason(tuned_blend, vllm)


class FakeEngine:
    model = SMOLLM2

    def __init__(self, free: int) -> None:
        self.free = free

    def prompt_tokens(self, call) -> int:
        return 30

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self) -> EngineStats:
        return EngineStats(kv_capacity_tokens=20_000, kv_used_tokens=20_000 - self.free, num_running=0, num_waiting=0)


class Profile:
    def __init__(self, profile: QueryProfile) -> None:
        self.p = profile

    def profile(self, query: str) -> QueryProfile:
        return self.p


def hits(n: int, tokens: int = 150) -> list[RetrievedChunk]:
    return [RetrievedChunk(Chunk(f"c{i}#0", f"c{i}", "text " * tokens, tokens), 1.0 - i / 100) for i in range(n)]


COLLECTION = SimpleNamespace(name="col", spec=SimpleNamespace(tokenizer="/x/smollm2", chunk_tokens=256))


@pytest.mark.parametrize("free", [20_000, 100])   # idle or nearly full: adaptive does not care
def test_adaptive_takes_the_most_expensive_pruned_plan_whatever_the_load(free):
    joint_high = QueryProfile(Complexity.HIGH, True, 2, (30, 60), confidence=0.5, source=ProfileSource.LEARNED)
    planner = AdaptivePlanner(FakeEngine(free), Config(), learned=Profile(joint_high))
    d = asyncio.run(planner.decide("Why did it happen?", COLLECTION, hits(30)))
    # pruned: stuff 2..6 and map_reduce 2..6 x 3 lengths; map_reduce:6 with the longest summaries
    # holds the most KV (6 maps of 150 tokens + their summaries, resident together)
    assert str(d.plan) == "map_reduce:6:78" and d.chosen.reason == "max_quality"
    assert d.queue_s == 0.0 and len(d.chosen.pruned) == 5 + 15
    planner.done(d)


def test_adaptive_drops_plans_above_the_engine_limit():
    single = QueryProfile(Complexity.LOW, True, 10, (30, 60), source=ProfileSource.LEARNED)
    config = Config(engine=EngineConfig(max_context_tokens=2048))
    planner = AdaptivePlanner(FakeEngine(20_000), config, learned=Profile(single))
    d = asyncio.run(planner.decide("Compare them", COLLECTION, hits(30)))
    # stuff over 10..30 chunks of 150 tokens: only ~12 chunks fit a 2,048-token call
    assert d.plan.method.value == "stuff" and 10 <= d.plan.num_chunks <= 13
    tiny = AdaptivePlanner(FakeEngine(20_000), Config(engine=EngineConfig(max_context_tokens=256)),
                           learned=Profile(single))
    d = asyncio.run(tiny.decide("Compare them", COLLECTION, hits(30)))
    assert d.chosen.reason == "smallest" and d.plan.num_chunks == 10


def test_metis_runs_no_golden_feedback_with_a_learned_profiler():
    """Golden runs only feed the LLM profiler's examples; with a learned one they are pure load."""
    low = QueryProfile(Complexity.LOW, False, 1, (30, 60), confidence=1.0, source=ProfileSource.LEARNED)
    planner = MetisPlanner(FakeEngine(20_000), Config(metis=MetisConfig(feedback_every=1)), learned=Profile(low))

    async def run() -> int:
        for _ in range(3):
            planner.done(await planner.decide("Who?", COLLECTION, hits(5)))
        spawned = len(planner._background)
        await planner.close()
        return spawned

    assert asyncio.run(run()) == 0


def test_chunk_prompt_tokens_count_long_titles_beyond_the_header_allowance():
    long_title = " ".join(["w"] * 20)   # qmsum/financebench titles run ~20 tokens
    titled = [RetrievedChunk(Chunk("a#0", "a", "text " * 100, 100, title=long_title), 1.0),
              RetrievedChunk(Chunk("b#0", "b", "text " * 50, 50), 0.9)]
    # FakeEngine counts words: "[1] " + 20 title words (+ newlines) = 21, 13 above an allowance of 8;
    # an untitled header ("[1]") fits the allowance
    assert chunk_prompt_tokens(FakeEngine(0), COLLECTION, titled, header_allowance=8) == [113, 50]


def test_adaptive_prices_long_titles_and_stays_under_the_engine_limit():
    single = QueryProfile(Complexity.LOW, True, 10, (30, 60), source=ProfileSource.LEARNED)
    config = Config(engine=EngineConfig(max_context_tokens=2048))
    titled = [RetrievedChunk(Chunk(f"c{i}#0", f"c{i}", "text " * 150, 150, title=" ".join(["w"] * 20)), 1.0)
              for i in range(30)]
    planner = AdaptivePlanner(FakeEngine(20_000), config, learned=Profile(single))
    d = asyncio.run(planner.decide("Compare them", COLLECTION, titled))
    # 150 text + ~21 header tokens per chunk: only ~11 chunks fit a 2,048-token call (untitled: ~12-13)
    assert d.plan.method.value == "stuff" and 10 <= d.plan.num_chunks <= 11


class ProfilingEngine(FakeEngine):
    """A serving engine whose LLM profiler would answer with a valid profile."""

    def __init__(self, free: int) -> None:
        super().__init__(free)
        self.calls: list = []

    async def generate(self, calls):
        from ragserve.domain import LLMResult

        self.calls += calls
        text = '{"complexity": "low", "joint_reasoning": true, "pieces": 2, "summary_range": [30, 60]}'
        return [LLMResult(text, 10, 20, 0.1, 0.2, token_logprobs=(-0.01,) * 20) for _ in calls]


@pytest.mark.parametrize("kind", ["adaptive", "metis"])
def test_eval_planners_profile_on_the_profiler_endpoint_like_serve(kind):
    """metis.profiler_endpoint: eval's planners profile there, as `serve` does, not on the serving
    engine. The endpoint is down, so the profile is the fallback; the serving engine is never asked."""
    import socket

    from ragserve.eval.systems import make_planner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(metis=MetisConfig(feedback_every=0, descriptions={"col": "notes"},
                                      profiler_endpoint=VllmEndpoint(f"http://127.0.0.1:{port}", "qwen")),
                    vllm=VllmConfig(max_retries=0, connect_timeout_s=1.0))
    engine = ProfilingEngine(20_000)
    planner = make_planner(parse_systems(kind)[0], engine, config)

    async def run():
        try:
            return await planner.decide("Who?", COLLECTION, hits(5))
        finally:
            await planner.close()

    decision = asyncio.run(run())
    assert decision.chosen.profile.source.value == "fallback" and engine.calls == []


def test_adaptive_and_metis_share_one_setup():
    from ragserve.metis.planner import INSTRUCTION_TOKENS

    config = Config(engine=EngineConfig(max_context_tokens=2048), metis=MetisConfig(offer_refine=True))
    adaptive = AdaptivePlanner(FakeEngine(20_000), config, learned=Profile(None))
    metis = MetisPlanner(FakeEngine(20_000), config, learned=Profile(None))
    assert adaptive.rules == metis.rules and adaptive.rules.offer_refine
    assert adaptive.cost.config == metis.cost.config and adaptive.cost.model == metis.cost.model
    assert adaptive.cost.model.max_context == 2048 and adaptive.max_chunks_needed == metis.max_chunks_needed == 30
    # FakeEngine.prompt_tokens of the two-turn probe is 30: 28 template tokens + the instructions
    assert metis.cost.config.overhead_tokens_per_call == 28 + INSTRUCTION_TOKENS


class ThreadRecordingEngine(FakeEngine):
    """Records the thread of every token count: a vLLM engine counts over HTTP, synchronously."""

    def __init__(self, free: int) -> None:
        super().__init__(free)
        self.count_threads: set[str] = set()

    def count_tokens(self, text: str) -> int:
        import threading

        self.count_threads.add(threading.current_thread().name)
        return super().count_tokens(text)


@pytest.mark.parametrize("kind", ["adaptive", "metis"])
def test_planners_count_tokens_off_the_event_loop_and_report_their_stats(kind):
    import threading

    from ragserve.eval.systems import make_planner

    engine = ThreadRecordingEngine(20_000)
    low = QueryProfile(Complexity.LOW, True, 2, (30, 60), confidence=1.0, source=ProfileSource.LEARNED)
    planner = make_planner(parse_systems(kind)[0], engine, Config(metis=MetisConfig(feedback_every=0)),
                           learned=Profile(low))

    async def run():
        decision = await planner.decide("Who?", COLLECTION, hits(5))
        during = planner.stats()
        planner.done(decision)
        await planner.close()
        return decision, during, planner.stats()

    decision, during, after = asyncio.run(run())
    assert engine.count_threads and threading.main_thread().name not in engine.count_threads
    if kind == "metis":
        assert during.held_tokens == decision.chosen.cost.kv_budget_tokens and after.held_tokens == 0
        assert after.plans == {"stuff": 1} and after.reasons == {"fit": 1} and after.num_waiting == 0
        assert after.kv_free_tokens == 20_000
    else:
        assert after.num_waiting == 0 and after.kv_free_tokens is None


class CountingEngine(FakeEngine):
    """Counts words like FakeEngine (`scale` = 1: the collection's tokenizer) and its calls."""

    def __init__(self, name: str, scale: int = 1) -> None:
        super().__init__(20_000)
        self.model = replace(SMOLLM2, name=name)
        self.scale = scale
        self.counted: list[str] = []

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return self.scale * len(text.split())


def test_stored_chunk_counts_are_used_when_the_engine_tokenizes_alike_whatever_its_model_name():
    """vLLM serving the collection's tokenizer under another name (--served-model-name, a hub
    id) must not fall back to counting every chunk over HTTP; another tokenizer must."""
    chunks = [RetrievedChunk(Chunk(f"c{i}#0", f"c{i}", "text " * 40, 40), 1.0) for i in range(8)]
    renamed = CountingEngine("my-served-smollm2")
    assert chunk_prompt_tokens(renamed, COLLECTION, chunks, header_allowance=8) == [40] * 8
    chunk_texts = [t for t in renamed.counted if t == chunks[0].chunk.text]
    assert len(chunk_texts) <= 3                       # the probe, not one count per chunk
    other = CountingEngine("smollm2", scale=2)           # the collection's name, another tokenizer
    assert chunk_prompt_tokens(other, COLLECTION, chunks, header_allowance=8) == [80] * 8
