"""CacheBlend on SmolLM2: segmentation, exactness at r = 100% and r = 0, selection modes,
recompute of a damaged store entry, and the engine's blended prefill path.

Exactness tests load the model in float32: our layer-wise forward calls the model's own
modules in the same order as HF's forward, so at r = 100% it is bit-identical there and the
tolerances only absorb GEMM shape effects. The bf16 test uses bf16's own resolution
(rtol 1.6e-2, as torch.testing's default for bf16) on KV and a logit atol of 0.1 (logits
are O(10); one bf16 ulp at 16 is 0.125).
"""
from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ragserve.config import BlendConfig, EngineConfig
from ragserve.errors import ConfigError
from ragserve.domain import Chunk, LLMCall
from ragserve.engines.local.blend import Blender, kv_spec, precompute_chunks, to_cache
from ragserve.engines.local.kv_store import KVStore
from ragserve.engines.local.models import model_dir
from ragserve.engines.local.segments import CHUNK, PREFIX, SUFFIX, from_pieces, segment_call
from ragserve.synthesis import answer_call, refine_call

pytestmark = pytest.mark.model

PASSAGES = [
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on "
     "radioactivity. She was the first woman to win a Nobel Prize and the only person to win Nobel "
     "Prizes in two scientific fields, physics in 1903 and chemistry in 1911."),
    ("Warsaw", "Warsaw is the capital and largest city of Poland. It stands on the Vistula River in "
     "east-central Poland. Marie Curie was born in Warsaw in 1867, when the city was part of the "
     "Russian Empire, and studied at a clandestine university there."),
    ("Radium", "Radium is a chemical element with the symbol Ra and atomic number 88. It was "
     "discovered by Marie and Pierre Curie in 1898 from the mineral uraninite. Pure radium is silvery "
     "white, but it readily reacts with nitrogen on exposure to air."),
]
QUESTION = "In which city was the discoverer of radium born?"


def make_chunks() -> list[Chunk]:
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=text, num_tokens=0, title=title)
            for i, (title, text) in enumerate(PASSAGES)]


def make_call() -> LLMCall:
    return answer_call(QUESTION, make_chunks(), max_tokens=8, stop=("\n",))


def load(dtype: torch.dtype):
    path = model_dir("smollm2")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def fp32():
    return load(torch.float32)


def make_blender(model, root, model_id: str = "smollm2-test") -> Blender:
    return Blender(model, KVStore(root, kv_spec(model, model_id), write_behind=False))


@pytest.fixture(scope="module")
def blender(fp32, tmp_path_factory):
    """Shared by the tests of this module: segments are computed once, then hit in RAM."""
    return make_blender(fp32[1], tmp_path_factory.mktemp("kv"))


@pytest.fixture(scope="module")
def prompt(fp32):
    return segment_call(fp32[0], make_call())


@pytest.fixture(scope="module")
def reference(fp32, prompt):
    """HF's own prefill of the prompt: (cache, last-token logits)."""
    return hf_prefill(fp32[1], prompt.token_ids)


@torch.inference_mode()
def hf_prefill(model, ids, past: DynamicCache | None = None, start: int = 0):
    cache = past if past is not None else DynamicCache()
    out = model(input_ids=torch.tensor([ids[start:]]), cache=cache, use_cache=True,
                position_ids=torch.arange(start, len(ids)).view(1, -1))
    return cache, out.logits[0, -1].float()


def assert_cache_close(a: DynamicCache, b: DynamicCache, **tol) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, **tol)
        torch.testing.assert_close(la.values, lb.values, **tol)


# -- segmentation ------------------------------------------------------------------------
def test_segments_cover_the_chat_template_prompt(fp32):
    tok, _ = fp32
    call = make_call()
    prompt = segment_call(tok, call)
    messages = [{"role": r, "content": c} for r, c in call.messages]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(prompt.token_ids) == list(ids)
    kinds = [s.kind for s in prompt.segments]
    assert kinds[0] == PREFIX and kinds[-1] == SUFFIX and kinds.count(CHUNK) == 3
    assert all(a.end == b.start for a, b in zip(prompt.segments, prompt.segments[1:]))
    assert prompt.chunk_context == prompt.token_ids[:prompt.segments[0].end]   # the prefix
    first = [s for s in prompt.segments if s.kind == CHUNK][0]
    assert tok.decode(prompt.ids(first)).startswith(" Marie Curie\nMarie Curie was")


def test_chunk_ids_do_not_depend_on_position(fp32):
    tok, _ = fp32
    chunks = make_chunks()
    forward, backward = segment_call(tok, answer_call("q?", chunks, 4)), segment_call(tok, answer_call("q?", chunks[::-1], 4))
    ids = lambda p: [p.ids(s) for s in p.segments if s.kind == CHUNK]  # noqa: E731
    assert ids(forward) == ids(backward)[::-1]


def test_calls_without_chunks_or_answer_layout_are_not_segmented(fp32):
    tok, _ = fp32
    assert segment_call(tok, LLMCall((("user", "hello"),), 4)) is None
    # the answer layout as bare text, without its structure: never parsed back
    assert segment_call(tok, LLMCall((("user", "Context:\n[1] x\n\nQuestion: y\nAnswer:"),), 4)) is None
    # passages in another layout (refine's later steps put the question first)
    assert segment_call(tok, refine_call("q?", "a", make_chunks()[0], 4)) is None


# -- exactness -----------------------------------------------------------------------------
def test_full_ratio_equals_full_prefill_fp32(blender, prompt, reference):
    ref_cache, ref_logits = reference
    result = blender.blend(prompt, BlendConfig(ratio=1.0))
    assert result.num_active == [(1, len(prompt))]
    assert_cache_close(result.cache, ref_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.logits, ref_logits, rtol=1e-5, atol=1e-4)


def test_full_ratio_equals_full_prefill_bf16(tmp_path):
    tok, model = load(torch.bfloat16)          # bf16 matmuls are slow on CPUs without AMX: one chunk
    prompt = segment_call(tok, answer_call(QUESTION, make_chunks()[2:], max_tokens=8))
    ref_cache, ref_logits = hf_prefill(model, prompt.token_ids)
    result = make_blender(model, tmp_path, "smollm2-test-bf16").blend(prompt, BlendConfig(ratio=1.0, mode="gradual"))
    assert_cache_close(result.cache, ref_cache, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(result.logits, ref_logits, rtol=1.6e-2, atol=0.1)
    assert result.logits.argmax() == ref_logits.argmax()


def test_layer0_rerotated_keys_equal_full_prefill_keys(blender, prompt, reference):
    ref_cache, _ = reference
    reused, stats = blender.gather(prompt)
    assert stats.num_ram + stats.num_computed == 4                    # prefix + 3 chunks
    rows = reused.reused
    torch.testing.assert_close(reused.keys[0][:, rows], ref_cache.layers[0].keys[0][:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reused.values[0][:, rows], ref_cache.layers[0].values[0][:, rows], rtol=1e-5, atol=1e-5)
    # the prefix is a true prefix: its stored KV is exact at every layer
    prefix = prompt.segments[0]
    for layer, ref in enumerate(ref_cache.layers):
        torch.testing.assert_close(reused.keys[layer][:, :prefix.end], ref.keys[0][:, :prefix.end], rtol=1e-4, atol=1e-4)


def test_zero_ratio_equals_concatenated_reused_kv(fp32, blender):
    """r = 0: every reused token keeps its stored KV; the question is computed over them,
    exactly as an HF prefill of the question on top of the concatenated stored KV."""
    tok, model = fp32
    call = answer_call(QUESTION, make_chunks()[:2], max_tokens=8)
    body = call.messages[-1][1]
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in call.messages],
                                       add_generation_prompt=True, tokenize=False)
    cut = rendered.index(body) + body.index("\n\nQuestion:")
    mid = rendered.index(body) + body.index("[2]")
    prompt = from_pieces(tok, [(PREFIX, rendered[:rendered.index(body)]), (CHUNK, rendered[rendered.index(body):mid]),
                               (CHUNK, rendered[mid:cut]), (SUFFIX, rendered[cut:])])
    assert [s.kind for s in prompt.segments] == [PREFIX, CHUNK, CHUNK, SUFFIX]   # no glue
    reused, _ = blender.gather(prompt)
    result = blender.blend(prompt, BlendConfig(ratio=0.0, sink_tokens=0), reused.clone())
    suffix = prompt.segments[-1]
    assert result.num_recomputed == suffix.num_tokens
    rows = reused.reused
    for layer in range(1, len(result.cache.layers)):                  # from the check layer on: stored KV
        assert torch.equal(result.cache.layers[layer].keys[0][:, rows], reused.keys[layer][:, rows])
        assert torch.equal(result.cache.layers[layer].values[0][:, rows], reused.values[layer][:, rows])
    past = to_cache([k[:, :suffix.start].unsqueeze(0).clone() for k in reused.keys],
                    [v[:, :suffix.start].unsqueeze(0).clone() for v in reused.values])
    ref_cache, ref_logits = hf_prefill(model, prompt.token_ids, past, suffix.start)
    torch.testing.assert_close(result.logits, ref_logits, rtol=1e-4, atol=1e-3)
    for got, ref in zip(result.cache.layers, ref_cache.layers):
        torch.testing.assert_close(got.keys[:, :, suffix.start:], ref.keys[:, :, suffix.start:], rtol=1e-4, atol=1e-4)


# -- selection ------------------------------------------------------------------------------
def test_single_mode_keeps_ratio_of_reused_plus_fresh(blender, prompt):
    result = blender.blend(prompt, BlendConfig(ratio=0.15, sink_tokens=0))
    want = prompt.num_fresh_tokens + math.ceil(0.15 * prompt.num_reused_tokens)
    assert result.num_active == [(1, want)] and result.num_recomputed == want
    assert result.compute_fraction < 0.35


def test_value_deviation_keeps_the_same_budget(blender, prompt):
    by_key = blender.blend(prompt, BlendConfig(ratio=0.15))
    by_value = blender.blend(prompt, BlendConfig(ratio=0.15, deviation="value"))
    assert by_value.num_active == by_key.num_active        # same budget, chosen by the values' deviation
    with pytest.raises(ConfigError, match="deviation"):
        BlendConfig(deviation="query")


def test_gradual_mode_selects_decreasing_counts(blender, prompt):
    config = BlendConfig(ratio=0.1, mode="gradual", check_layers=(1, 2, 3, 5))
    result = blender.blend(prompt, config)
    layers = [layer for layer, _ in result.num_active]
    counts = [n for _, n in result.num_active]
    assert layers == [1, 2, 3, 5]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[0] == prompt.num_fresh_tokens + math.ceil(0.2 * prompt.num_reused_tokens)
    assert counts[-1] == prompt.num_fresh_tokens + math.ceil(0.1 * prompt.num_reused_tokens)


def test_damaged_store_entry_is_recomputed_not_used(fp32, tmp_path):
    tok, model = fp32
    blender = make_blender(model, tmp_path)
    chunks = make_chunks()[:2]
    stats = precompute_chunks(blender, tok, chunks)
    assert stats.num_computed == 3 and stats.num_ram == 1             # the prefix is shared
    prompt = segment_call(tok, answer_call(QUESTION, chunks, max_tokens=8))
    reused, stats = blender.gather(prompt)
    assert stats.num_computed == 0 and stats.num_ram == 3
    store = blender.store
    victim = next(store.dir.rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-100])
    store.drop_ram()
    again, stats = blender.gather(prompt)
    assert (stats.num_disk, stats.num_computed, store.stats.corrupt) == (2, 1, 1)
    assert torch.equal(again.keys, reused.keys) and torch.equal(again.values, reused.values)


# -- engine ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_engine_blended_call_matches_plain_engine(tmp_path, monkeypatch, smollm2_engine):
    from ragserve.engines.local.engine import LocalEngine

    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path))
    engine = LocalEngine(EngineConfig(model="smollm2"), BlendConfig(enabled=True, ratio=1.0, min_tokens=0))

    async def both():
        calls = [make_call(), LLMCall((("user", "Say hi."),), 4)]
        return await engine.generate(calls), await smollm2_engine.generate(calls)

    try:
        blended, plain = asyncio.run(both())
    finally:
        asyncio.run(engine.close())
    assert [r.text for r in blended] == [r.text for r in plain]
    assert engine.blend_counters["blended_calls"] == 1
    assert any(tmp_path.joinpath("kv").rglob("*.safetensors"))
