"""The single-endpoint client against a fake vLLM server: bounded retries with backoff for
connection errors and 5xx, none once tokens reached the caller, none after a timeout or a
rejected request; exact parsing of a streamed answer; cached token counts."""
from __future__ import annotations

import asyncio

import pytest

from ragserve.config import VllmConfig, VllmEndpoint
from ragserve.domain import LLMCall
from ragserve.engines.vllm.client import EndpointFailed, VllmClient
from ragserve.errors import BadInput
from tests.vllm.fake_server import FakeVllm, chat_ids, free_port

CALL = LLMCall((("system", "Be brief."), ("user", "Capital of France?")), max_tokens=8, stop=("\n",))


def make_config(**overrides) -> VllmConfig:
    base = dict(max_retries=3, retry_backoff_s=0.01, timeout_s=5.0, connect_timeout_s=1.0, scrape_timeout_s=1.0)
    return VllmConfig(**{**base, **overrides})


@pytest.fixture
def server():
    fake = FakeVllm().start()
    yield fake
    fake.kill()


def client_for(url: str, **overrides) -> VllmClient:
    return VllmClient(VllmEndpoint(url, "smollm2"), make_config(**overrides))


def run(client: VllmClient, call: LLMCall = CALL, **kwargs):
    async def go():
        try:
            return await client.run(call, **kwargs)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_streamed_answer_is_parsed(server):
    call = LLMCall(CALL.messages, max_tokens=3, stop=("\n",), logprobs=True, temperature=0.0)
    pieces: list[str] = []
    result = run(client_for(server.url), call, on_piece=pieces.append)
    assert pieces == ["Paris", " is", " the"]
    assert result.text == "Paris is the" and result.finish_reason == "length"
    assert (result.prompt_tokens, result.output_tokens) == (11, 3)
    assert result.token_logprobs == (-0.5, -1.0, -1.5)
    assert 0 < result.ttft_s <= result.total_s and result.queue_s == 0.0
    body = server.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["stop"] == ["\n"] and body["logprobs"] is True and body["max_tokens"] == 3
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Capital of France?"}]


def test_no_logprobs_unless_asked(server):
    result = run(client_for(server.url))
    assert result.text == "Paris is the answer" and result.finish_reason == "stop"
    assert result.token_logprobs == () and "logprobs" not in server.bodies[-1]


def test_retries_5xx_then_succeeds(server):
    server.script = ["503", "503"]
    result = run(client_for(server.url))
    assert result.text == "Paris is the answer"
    assert server.count("/v1/chat/completions") == 3


def test_gives_up_after_max_retries(server):
    server.script = ["503"] * 10
    with pytest.raises(EndpointFailed, match="after 3 attempt") as info:
        run(client_for(server.url, max_retries=2))
    assert info.value.endpoint_down and not info.value.streamed
    assert server.count("/v1/chat/completions") == 3


def test_connection_refused_is_retried_then_reported():
    client = client_for(f"http://127.0.0.1:{free_port()}", max_retries=2)
    with pytest.raises(EndpointFailed, match="ConnectError") as info:
        run(client)
    assert info.value.endpoint_down and not info.value.streamed


def test_connection_dropped_before_any_token_is_retried(server):
    server.script = ["drop"]
    assert run(client_for(server.url)).text == "Paris is the answer"
    assert server.count("/v1/chat/completions") == 2


def test_no_retry_once_pieces_reached_the_caller(server):
    server.script = ["drop_after:2"]
    pieces: list[str] = []
    with pytest.raises(EndpointFailed, match="after streaming began") as info:
        run(client_for(server.url), on_piece=pieces.append)
    assert info.value.streamed and pieces == ["Paris", " is"]
    assert server.count("/v1/chat/completions") == 1


def test_buffered_call_reruns_after_a_break_mid_answer(server):
    """generate() returns text whole: tokens of a broken attempt never left the client."""
    server.script = ["drop_after:2"]
    assert run(client_for(server.url)).text == "Paris is the answer"
    assert server.count("/v1/chat/completions") == 2


def test_buffered_rerun_can_be_switched_off(server):
    server.script = ["drop_after:2"]
    with pytest.raises(EndpointFailed, match="after streaming began"):
        run(client_for(server.url, retry_buffered=False))
    assert server.count("/v1/chat/completions") == 1


def test_rejected_request_is_not_retried(server):
    server.script = ["400"]
    with pytest.raises(BadInput, match=r"rejected the call \(HTTP 400\): fake 400"):
        run(client_for(server.url))
    assert server.count("/v1/chat/completions") == 1


def test_timeout_is_not_retried(server):
    server.script = ["hang"]
    with pytest.raises(EndpointFailed, match="timed out") as info:
        run(client_for(server.url, timeout_s=0.5))
    assert not info.value.endpoint_down
    assert server.count("/v1/chat/completions") <= 1   # 0 when a busy machine times out before it lands


def test_token_prompt_goes_to_completions(server):
    result = run(client_for(server.url), LLMCall(CALL.messages, 2, logprobs=True), prompt_ids=[1, 2, 3])
    assert result.text == "Paris is" and result.token_logprobs == (-0.5, -1.0)
    assert server.count("/v1/completions") == 1
    assert server.bodies[-1]["prompt"] == [1, 2, 3] and server.bodies[-1]["logprobs"] == 1


def test_token_counts_are_exact_and_cached(server):
    client = client_for(server.url)
    expected_chat = len(chat_ids([{"role": r, "content": c} for r, c in CALL.messages]))
    assert client.count_text_tokens("three words") == 11
    assert client.count_text_tokens("three words") == 11
    assert client.count_chat_tokens(CALL.messages) == expected_chat
    assert client.count_chat_tokens(CALL.messages) == expected_chat
    assert server.count("/tokenize") == 2
    assert server.bodies == [] and client.tokenize("ab", True) == (1, 97, 98)


def test_scrape_and_health(server):
    server.usage, server.running = 0.5, 2
    client = client_for(server.url)

    async def go():
        try:
            load, healthy = await client.scrape(), await client.health()
            assert healthy and load.num_running == 2 and load.kv_free_tokens == 45 * 128
            assert client.scrape_sync() == load
            server.kill()
            assert not await client.health()
            with pytest.raises(EndpointFailed, match="metrics failed"):
                await client.scrape()
            with pytest.raises(EndpointFailed, match="metrics failed"):
                client.scrape_sync()
        finally:
            await client.aclose()
    asyncio.run(go())
