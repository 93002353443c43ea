"""Routing across fake vLLM replicas: most free KV wins, stats() is that replica's snapshot,
a failed endpoint is taken out and its calls move on, health checks bring it back; and
VllmEngine over fakes (model shape, concurrent fan-out)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from ragserve.config import VllmConfig, VllmEndpoint
from ragserve.domain import LLMCall
from ragserve.engines.vllm import VllmEngine
from ragserve.engines.vllm.client import EndpointFailed, VllmClient
from ragserve.engines.vllm.router import ReplicaSet, _Reservation
from ragserve.errors import EngineUnavailable
from tests.vllm.fake_server import FakeVllm, chat_ids, free_port

CALL = LLMCall((("system", "Be brief."), ("user", "Capital of France?")), max_tokens=8, tag="test")


def make_config(urls, **overrides) -> VllmConfig:
    base = dict(endpoints=tuple(VllmEndpoint(u, "smollm2") for u in urls), max_retries=2,
                retry_backoff_s=0.01, timeout_s=5.0, connect_timeout_s=1.0, scrape_timeout_s=1.0,
                scrape_interval_s=0.05, max_staleness_s=5.0)
    return VllmConfig(**{**base, **overrides})


def make_set(config: VllmConfig) -> ReplicaSet:
    replicas = ReplicaSet([VllmClient(ep, config) for ep in config.endpoints], config)
    replicas.refresh_sync()
    return replicas


async def runner(replica, call, max_retries, on_first):
    return await replica.client.run(call, max_retries=max_retries, on_first_token=on_first)


@pytest.fixture
def servers():
    fakes = [FakeVllm().start(), FakeVllm().start()]
    yield fakes
    for f in fakes:
        f.kill()


def test_routes_to_most_free_kv_and_reports_that_snapshot(servers):
    a, b = servers
    a.usage, b.usage, b.running = 0.8, 0.2, 3
    replicas = make_set(make_config([a.url, b.url]))
    best = replicas.best()
    assert best.base_url == b.url
    stats = replicas.stats()
    assert stats.kv_capacity_tokens == 91 * 128
    assert stats.kv_free_tokens == round(0.8 * 90) * 128 and stats.num_running == 3
    assert 0 <= stats.age_s < 5


def test_calls_the_scrape_does_not_show_count_against_a_replica(servers):
    a, b = servers
    a.usage, b.usage = 0.30, 0.25    # b is 5% (~576 tokens) freer
    replicas = make_set(make_config([a.url, b.url]))
    rb = replicas.best()
    assert rb.base_url == b.url
    rb.active[0] = _Reservation(1000)          # our call on b, before its first token
    assert replicas.best().base_url == a.url
    assert replicas.stats().kv_used_tokens == replicas.best().load.kv_used_tokens
    replicas.refresh_sync([rb])                # not scheduled yet as far as we know: still counted
    assert rb.pending_tokens() == 1000 and replicas.best().base_url == a.url
    rb.active[0].visible_t = time.monotonic()  # first token: a scrape begun after this shows it
    replicas.refresh_sync([rb])
    assert rb.pending_tokens() == 0 and replicas.best().base_url == b.url


def test_concurrent_batches_spread_over_replicas(servers):
    """Each batch is reserved on its replica when routed, before any request is sent."""
    a, b = servers
    a.chunk_delay_s = b.chunk_delay_s = 0.05
    replicas = make_set(make_config([a.url, b.url]))

    async def go():
        return await asyncio.gather(*(replicas.run_batch([CALL] * (1 + i % 2), runner) for i in range(6)))
    asyncio.run(go())
    assert a.count("/v1/chat/completions") > 0 and b.count("/v1/chat/completions") > 0
    assert sum(r.num_calls for r in replicas.replicas) == 9
    assert all(r.in_flight == 0 for r in replicas.replicas)


def test_batch_goes_to_one_replica_concurrently(servers):
    a, b = servers
    a.usage, b.usage = 0.5, 0.1
    b.chunk_delay_s = 0.25     # each call streams for ~1 s: the four overlap even on a busy machine
    replicas = make_set(make_config([a.url, b.url]))
    results = asyncio.run(replicas.run_batch([CALL] * 4, runner))
    assert [r.text for r in results] == ["Paris is the answer"] * 4
    assert b.count("/v1/chat/completions") == 4 and a.count("/v1/chat/completions") == 0
    assert b.max_in_flight == 4      # sent together, so vLLM can batch them


def test_failed_endpoint_is_taken_out_and_calls_move(servers):
    a, b = servers
    a.usage, b.usage = 0.1, 0.5
    replicas = make_set(make_config([a.url, b.url]))
    a.kill()                       # dies after its last scrape: still looks best
    assert replicas.best().base_url == a.url
    results = asyncio.run(replicas.run_batch([CALL] * 3, runner))
    assert [r.text for r in results] == ["Paris is the answer"] * 3
    assert b.count("/v1/chat/completions") == 3
    ra = replicas.replicas[0]
    assert not ra.healthy and "ConnectError" in ra.error
    assert replicas.best().base_url == b.url


def test_calls_cut_mid_answer_move_when_nothing_reached_the_caller(servers):
    a, b = servers
    a.usage, b.usage = 0.1, 0.5
    a.script = ["drop_after:2"] * 3
    replicas = make_set(make_config([a.url, b.url]))
    results = asyncio.run(replicas.run_batch([CALL] * 3, runner))
    assert [r.text for r in results] == ["Paris is the answer"] * 3
    assert a.count("/v1/chat/completions") == 3 and b.count("/v1/chat/completions") == 3


def test_streamed_call_is_not_moved_after_pieces(servers):
    a, b = servers
    a.usage, b.usage = 0.1, 0.5
    a.script = ["drop_after:1"]
    replicas = make_set(make_config([a.url, b.url]))
    pieces: list[str] = []

    async def streaming(replica, call, max_retries, on_first):
        return await replica.client.run(call, pieces.append, max_retries=max_retries)
    with pytest.raises(EndpointFailed) as info:
        asyncio.run(replicas.run_call(CALL, streaming))
    assert info.value.streamed and pieces == ["Paris"]
    assert b.count("/v1/chat/completions") == 0


def test_health_checks_bring_an_endpoint_back(servers):
    a, b = servers
    replicas = make_set(make_config([a.url, b.url]))
    a.kill()

    async def scenario():
        await replicas.refresh(replicas.replicas[0])
        assert not replicas.replicas[0].healthy
        a.restart()
        replicas.ensure_monitor()            # background: /health, then /metrics
        for _ in range(500):
            await asyncio.sleep(0.02)
            if replicas.replicas[0].healthy:
                break
        await replicas.close()
    asyncio.run(scenario())
    assert replicas.replicas[0].healthy and replicas.replicas[0].error == ""


def test_no_healthy_endpoint_is_unavailable_with_reasons(servers):
    dead = f"http://127.0.0.1:{free_port()}"
    replicas = make_set(make_config([dead]))
    with pytest.raises(EngineUnavailable, match=f"no healthy vLLM endpoint.*{dead}"):
        replicas.stats()
    with pytest.raises(EngineUnavailable, match="no healthy"):
        asyncio.run(replicas.run_batch([CALL], runner))


def test_all_replicas_failing_reports_every_one(servers):
    a, b = servers
    replicas = make_set(make_config([a.url, b.url]))
    a.kill()
    b.kill()
    with pytest.raises(EngineUnavailable, match="failed on .*127.0.0.1.*127.0.0.1"):
        asyncio.run(replicas.run_batch([CALL], runner))


def test_stale_snapshot_is_refreshed_before_it_is_returned(servers):
    a, _ = servers
    replicas = make_set(make_config([a.url], max_staleness_s=0.2))
    replicas.replicas[0].scraped_t -= 10          # pretend the last scrape is old
    before = a.count("/metrics")
    a.usage = 0.5
    stats = replicas.stats()
    assert a.count("/metrics") == before + 1 and stats.age_s < 0.2
    assert stats.kv_free_tokens == 45 * 128


def test_engine_over_fakes(servers, tmp_path):
    a, b = servers
    b.chunk_delay_s = 0.25
    a.usage, b.usage = 0.6, 0.1
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256,
         "torch_dtype": "bfloat16"}))
    engine = VllmEngine(make_config([a.url, b.url], hf_config=str(tmp_path)))
    assert (engine.model.num_layers, engine.model.num_kv_heads, engine.model.head_dim) == (4, 2, 32)
    assert engine.model.max_context == 4096
    # The fake's page (captured from SmolLM2) gives 46091 B/token, ~90 B per value of this
    # shape: not a dtype size, so config.json's bf16 is kept.
    assert engine.model.dtype_bytes == 2
    assert engine.stats().kv_free_tokens == round(0.9 * 90) * 128
    assert engine.count_tokens("a b c") == 5
    assert engine.prompt_tokens(CALL) == len(chat_ids([{"role": r, "content": c} for r, c in CALL.messages]))

    async def go():
        try:
            results = await engine.generate([CALL] * 3)
            pieces = [p async for p in engine.stream(CALL)]
            return results, pieces
        finally:
            await engine.close()
    results, pieces = asyncio.run(go())
    assert [r.text for r in results] == ["Paris is the answer"] * 3 and pieces == ["Paris", " is", " the", " answer"]
    assert b.max_in_flight == 3


def test_engine_needs_an_endpoint():
    from ragserve.errors import ConfigError

    with pytest.raises(ConfigError, match="vllm.endpoints is empty"):
        VllmEngine(VllmConfig())
    with pytest.raises(EngineUnavailable, match="no healthy vLLM endpoint"):
        VllmEngine(make_config([f"http://127.0.0.1:{free_port()}"]))


def test_engine_takes_kv_dtype_from_the_servers_kv_size(servers, tmp_path):
    """SmolLM2's shape with the captured page (512 MiB for 11648 tokens) measures 4 B per value:
    the server runs fp32 although config.json says bf16."""
    a, _ = servers
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
         "hidden_size": 576, "dtype": "bfloat16"}))
    engine = VllmEngine(make_config([a.url], hf_config=str(tmp_path / "config.json")))
    assert engine.model.dtype_bytes == 4 and engine.model.kv_bytes_per_token == 46080
    assert engine.stats().kv_bytes_per_token == 46080
    asyncio.run(engine.close())
