"""The LMCache blend prompt layout (sys + sep + chunk + ... + sep + question as token ids).

LMCache blending itself needs a CUDA vLLM with LMCacheConnectorV1: it cannot run on the CPU
test server, so these tests check the layout, with LMCache's own split rule re-implemented
(segments between occurrences of encode(blend_special_str)[1:])."""
from __future__ import annotations

import asyncio
import json

import pytest

from ragserve import prompts
from ragserve.config import VllmConfig, VllmEndpoint
from ragserve.domain import Chunk, LLMCall
from ragserve.engines.vllm import VllmEngine, lmcache
from ragserve.synthesis import answer_call, map_rerank_call, map_summary_call, refine_call
from tests.vllm.fake_server import FakeVllm, chat_ids, decode, text_ids

SEP = " # # "


def chunk(i: int, title: str = "") -> Chunk:
    return Chunk(id=f"doc#{i}", doc_id="doc", text=f"Passage {i} says {i * 11}.", num_tokens=5, title=title)


def lmcache_segments(ids: list[int], sep: list[int]) -> list[list[int]]:
    """LMCache's SegmentTokenDatabase split: cut at every occurrence of `sep`."""
    out, start, i = [], 0, 0
    while i <= len(ids) - len(sep):
        if ids[i:i + len(sep)] == sep:
            out.append(ids[start:i])
            i = start = i + len(sep)
        else:
            i += 1
    return out + [ids[start:]]


def test_answer_prompt_layout_drops_rank_markers():
    chunks = [chunk(1, "Alpha"), chunk(2), chunk(3, "Gamma")]
    call = answer_call("Who?", chunks, 16)
    layout = lmcache.context_layout(call)
    assert layout.head == "Context:\n"
    assert layout.passages == ("Alpha\nPassage 1 says 11.", "Passage 2 says 22.", "Gamma\nPassage 3 says 33.")
    assert layout.tail == "\n\nQuestion: Who?\nAnswer:"
    # the layout renders back to the message the call sends
    marked = "\n\n".join(f"[{i}] {p}" for i, p in enumerate(layout.passages, 1))
    assert layout.head + marked + layout.tail == call.messages[-1][1]
    # The same chunk at another rank is the same segment text (its KV is reusable there).
    swapped = lmcache.context_layout(answer_call("Who?", chunks[::-1], 16))
    assert swapped.passages == layout.passages[::-1]


def test_other_passage_layouts():
    c = chunk(4, "Delta")
    rerank = lmcache.context_layout(map_rerank_call("Who?", c, 8))
    assert rerank.passages == ("Delta\nPassage 4 says 44.",) and rerank.tail.startswith("\n\nQuestion: Who?")
    summary = lmcache.context_layout(map_summary_call("Who?", c, 32))
    assert summary.head == "Passage:\n" and summary.passages == rerank.passages
    # refine's passage comes after the question and the current answer: its head holds them
    refine = lmcache.context_layout(refine_call("Who?", "x", c, 8))
    assert refine.head.startswith("Question: Who?\nCurrent answer: x") and refine.passages == rerank.passages


def test_layout_comes_from_structure_not_text():
    assert lmcache.context_layout(LLMCall((("user", "Context:\n[1] a\n\nQuestion: q\nAnswer:"),), 4)) is None
    # a passage whose text looks like the next marker stays one passage
    c = Chunk("t#0", "t", "a\n\n[2] b", 5)
    assert lmcache.context_layout(answer_call("q", [c], 4)).passages == ("a\n\n[2] b",)


def test_blend_prompt_is_what_lmcache_splits_back():
    sep = lmcache.separator_ids(text_ids(SEP, add_special_tokens=True))
    assert sep == text_ids(SEP)                            # the first (BOS-like) id is dropped
    sys_ids, chunks, question = text_ids("SYS"), [text_ids("one"), text_ids("two")], text_ids("Q?")
    ids = lmcache.blend_prompt(sys_ids, chunks, question, sep)
    assert decode(ids) == "SYS # # one # # two # # Q?"
    assert lmcache_segments(ids, sep) == [sys_ids, *chunks, question]


def test_separator_needs_tokens_after_the_first():
    with pytest.raises(ValueError, match="longer string"):
        lmcache.separator_ids([5])


def test_chat_frame_is_the_template_around_the_user_message():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Context:\nabc\nAnswer:"}]
    full = chat_ids(msgs)
    empty = chat_ids([msgs[0], {"role": "user", "content": ""}])
    head, tail = lmcache.chat_frame(full, empty)
    assert decode(head) == "<s>system\nS</s>\n<s>user\n"
    assert decode(tail) == "</s>\n<s>assistant\n"
    assert decode(full[len(head):len(full) - len(tail)]) == "Context:\nabc\nAnswer:"
    assert lmcache.contains(full, text_ids("abc")) and not lmcache.contains(full, text_ids("xyz"))


def test_blend_endpoint_gets_token_prompt_in_lmcache_layout(tmp_path):
    """End to end over a fake server: a blend-enabled endpoint receives /v1/completions with the
    layout; calls without passages (the profiler's) still go to chat completions."""
    fake = FakeVllm().start()
    try:
        (tmp_path / "config.json").write_text(json.dumps(
            {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}))
        config = VllmConfig(endpoints=(VllmEndpoint(fake.url, "smollm2", lmcache_blend=True, blend_special_str=SEP),),
                            hf_config=str(tmp_path), retry_backoff_s=0.01)
        engine = VllmEngine(config)
        chunks = [chunk(1, "Alpha"), chunk(2)]
        call = answer_call("Who?", chunks, 4)
        plain = LLMCall((("user", "Who?"),), 4)

        async def go():
            try:
                return await engine.generate([call, plain])
            finally:
                await engine.close()
        asyncio.run(go())
    finally:
        fake.kill()
    (completion,) = [b for b in fake.bodies if "prompt" in b]
    assert decode(completion["prompt"]) == (
        f"<s>system\n{prompts.SYSTEM}</s>\n<s>user\nContext:\n"
        " # # Alpha\nPassage 1 says 11. # # Passage 2 says 22. # # "
        "\n\nQuestion: Who?\nAnswer:</s>\n<s>assistant\n")
    assert fake.count("/v1/completions") == 1 and fake.count("/v1/chat/completions") == 1
