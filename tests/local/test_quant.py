"""Quantized linear layers: the formats round-trip, the decode and prefill kernels agree, the
quantized weights are cached, greedy answers match the unquantized model on SmolLM2, and
CacheBlend and LLMSteer keep their guarantees on the quantized model."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from ragserve.config import BlendConfig, ConfigError, EngineConfig, SteerConfig
from ragserve.domain import Chunk, LLMCall
from ragserve.engines.local import quant
from ragserve.engines.local.blend import Blender, kv_spec
from ragserve.engines.local.kv_store import KVStore
from ragserve.engines.local.models import model_dir, quantized_dir, source_id
from ragserve.engines.local.runner import ModelRunner
from ragserve.engines.local.segments import segment_call
from ragserve.engines.local.steer import Steerer
from ragserve.synthesis import answer_call
from tests.local.test_steer import PASSAGES

PROMPTS = [   # the fixed greedy set: RAG answers and free text
    answer_call("In which city was Marie Curie born?", [], 12),
    answer_call("Who discovered radium?", [], 12),
    LLMCall((("user", "What is the capital of France?"),), 12),
    LLMCall((("user", "Name three primary colors."),), 12),
    LLMCall((("user", "Write one sentence about the sea."),), 12),
    LLMCall((("system", "You are a helpful assistant."), ("user", "What is 2 + 2?")), 12),
]


def make_chunks() -> list[Chunk]:
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=text, num_tokens=0, title=title)
            for i, (title, text) in enumerate(PASSAGES)]


def rag_call(question: str, max_tokens: int = 12) -> LLMCall:
    return answer_call(question, make_chunks(), max_tokens, stop=("\n",))


def greedy(runner: ModelRunner, call: LLMCall) -> tuple[list[int], torch.Tensor]:
    """The greedy answer's tokens and the next-token logits before each [len, V]."""
    kv, logits = runner.prefill([runner.encode_call(call)])
    out: list[int] = []
    steps = []
    for _ in range(call.max_tokens):
        tok = int(logits.argmax(-1)[0])
        if tok in runner.eos_ids:
            break
        out.append(tok)
        steps.append(logits[0])
        kv, logits = runner.decode_step(kv, [tok])
    return out, torch.stack(steps)


def test_config_rejects_unknown_quantization():
    with pytest.raises(ConfigError, match="int3"):
        EngineConfig(quantization="int3")


# -- formats and kernels (random weights, no model) --------------------------------------------
def test_int8_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 96)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int4_round_trip_error_is_within_half_a_step():
    w = torch.randn(32, 128)
    nib, scale, zero = quant.quantize_int4(w, 64)
    assert nib.shape == (32, 64) and scale.shape == (32, 2)
    q = quant._unpack_int4(nib).float().view(32, 2, 64)
    back = ((q - 8) * scale[..., None] + zero[..., None]).view(32, 128)
    assert ((back - w).abs().view(32, 2, 64) <= scale[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decode_and_prefill_kernels_compute_the_same_layer(mode):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    if mode == "int8":
        layer: nn.Module = quant.Int8Linear(*quant.quantize_int8(lin.weight), lin.bias)
    else:
        layer = quant.Int4Linear(*quant.quantize_int4(lin.weight, 128), lin.bias)
    x = torch.randn(3, 256)
    small = layer(x)                                     # 3 rows: the decode kernel
    dense = layer(x.repeat(quant.MAX_DECODE_ROWS, 1))[:3]  # 48 rows: dequantize + dense GEMM
    # The decode kernels round activations to bf16 (int8) or run in bf16 tiles: bf16 tolerance.
    torch.testing.assert_close(small, dense, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dense, lin(x), rtol=0.1, atol=0.1 if mode == "int8" else 0.3)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_siblings_compute_what_the_separate_projections_do(mode):
    torch.manual_seed(0)

    def quantized(lin: nn.Linear) -> nn.Module:
        if mode == "int8":
            return quant.Int8Linear(*quant.quantize_int8(lin.weight), lin.bias)
        return quant.Int4Linear(*quant.quantize_int4(lin.weight, 128), lin.bias)

    block = nn.Module()
    for name, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("gate_proj", 96), ("up_proj", 96)):
        setattr(block, name, quantized(nn.Linear(256, out, bias=name != "up_proj")))
    x = torch.randn(1, 2, 256)
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    want = [getattr(block, n)(x) for n in names]
    assert quant.fuse_siblings(block) == 2
    assert all(isinstance(getattr(block, n), quant.SiblingLinear) for n in names)
    for _ in range(2):   # the second pass: the cached parts were released, not reused stale
        for n, w in zip(names, want):
            torch.testing.assert_close(getattr(block, n)(x), w, rtol=1e-2, atol=1e-2)
    other = torch.randn(1, 2, 256)   # a new input is computed, not served from the cache
    torch.testing.assert_close(block.k_proj(other), quantized_ref(block, other, 64, 96), rtol=1e-2, atol=1e-2)
    assert block.q_k_v_fused._x is other   # held until q and v take their parts


def quantized_ref(block: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return block.q_k_v_fused.fused(x)[..., start:stop]


# -- the model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain() -> ModelRunner:
    return ModelRunner(model_dir("smollm2"), "smollm2", dtype="fp32")


@pytest.fixture(scope="module")
def int8() -> ModelRunner:
    return ModelRunner(model_dir("smollm2"), "smollm2", dtype="fp32", quantization="int8",
                       quant_cache=quantized_dir("smollm2", "int8"))


@pytest.mark.model
def test_every_linear_layer_is_quantized(int8):
    linears = [n for n, m in int8.model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == []
    assert isinstance(int8.model.lm_head, quant.Int8Linear) == quant.LM_HEAD


def forced_logits(runner: ModelRunner, call: LLMCall, tokens: list[int]) -> torch.Tensor:
    """Next-token logits [len(tokens), V] along `tokens`: prefill, then one decode step each."""
    kv, logits = runner.prefill([runner.encode_call(call)])
    out = [logits[0]]
    for tok in tokens[:-1]:
        kv, logits = runner.decode_step(kv, [tok])
        out.append(logits[0])
    return torch.stack(out)


CONFIDENT = 0.5   # logits: a top-1 lead the quantization error (~0.1 here) cannot flip


@pytest.mark.model
def test_int8_greedy_outputs_match_unquantized(plain, int8):
    """Along the unquantized greedy answer (teacher-forced, so one near-tie cannot derail
    the rest), int8 picks the same token wherever the unquantized model is confident."""
    same_answers = confident = agree = 0
    calls = PROMPTS + [rag_call(q) for q in ("Where was the discoverer of radium born?", "Who discovered radium?",
                                             "When was Marie Curie born?", "What is the symbol of radium?")]
    for call in calls:
        ref, want = greedy(plain, call)
        got = forced_logits(int8, call, ref)
        top = want.topk(2, dim=-1).values
        sure = (top[:, 0] - top[:, 1]) >= CONFIDENT                   # [len(ref)]
        picks = got.argmax(-1) == want.argmax(-1)
        confident += int(sure.sum())
        agree += int(picks[sure].sum())
        same_answers += bool(picks.all())                             # int8's greedy answer is the same
    assert agree == confident and confident >= 50
    assert same_answers >= len(calls) // 2   # measured: 6 of 10 identical greedy answers


@pytest.mark.model
def test_quantized_weights_are_cached_and_keyed_by_source(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = model_dir("smollm2")
    cache = tmp_path / "smollm2-int8"

    def fresh():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    first = fresh()
    quant.quantize_model(first, "int8", cache, source_id(path))
    assert (cache / "quantized.safetensors").is_file()
    real = quant._quantize_tensors

    def must_not_run(*args):
        raise AssertionError("quantized again although the cache holds these weights")

    monkeypatch.setattr(quant, "_quantize_tensors", must_not_run)
    second = fresh()
    quant.quantize_model(second, "int8", cache, source_id(path))   # loads from the cache
    for (n, a), (_, b) in zip(first.named_buffers(), second.named_buffers()):
        assert torch.equal(a, b), n
    calls = []
    monkeypatch.setattr(quant, "_quantize_tensors", lambda *a: calls.append(1) or real(*a))
    quant.quantize_model(fresh(), "int8", cache, "other-weights")    # other source: rebuilt
    assert calls == [1]


# -- CacheBlend and LLMSteer on the quantized model ------------------------------------------
@pytest.mark.model
def test_blend_full_ratio_equals_quantized_full_prefill(int8, tmp_path):
    prompt = segment_call(int8.tokenizer, rag_call("Where was Marie Curie born?"))
    assert prompt is not None
    blender = Blender(int8.model, KVStore(tmp_path, kv_spec(int8.model, "smollm2-int8-test"), write_behind=False))
    _, ref_logits = int8.prefill([list(prompt.token_ids)])
    result = blender.blend(prompt, BlendConfig(ratio=1.0))
    # Chunk KV is computed per chunk (fewer rows than the prompt): short chunks may take the
    # decode kernel, whose bf16 activations differ from the dense path by bf16 rounding.
    torch.testing.assert_close(result.logits, ref_logits[0], rtol=0.05, atol=0.3)
    assert int(result.logits.argmax()) == int(ref_logits.argmax())


@pytest.mark.model
def test_steer_alpha_one_leaves_quantized_logits_unchanged(int8, tmp_path):
    prompt = segment_call(int8.tokenizer, answer_call("Where was Marie Curie born?", make_chunks(), 8))
    assert prompt is not None
    _, logits_ref = int8.prefill([list(prompt.token_ids)])
    store = KVStore(tmp_path, kv_spec(int8.model, "smollm2-int8-steer"), write_behind=False)
    row = Steerer(int8.model, int8.tokenizer, store, SteerConfig(alpha=1.0)).row(prompt)
    assert row is not None and row.num_steered > 0
    _, logits = int8.prefill([list(prompt.token_ids)], [row])
    # alpha 1 changes nothing but the attention path, whose fp32 result may differ in the last
    # bits from SDPA's (machine-dependent); the int8 kernel rounds a one-row input (the last
    # position, into the lm head) to bf16, so such a difference can surface as one bf16 step.
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)
    assert int(logits.argmax()) == int(logits_ref.argmax())


@pytest.mark.model
def test_quantized_engine_blends_and_steers(tmp_path, monkeypatch):
    from ragserve.engines.local.engine import LocalEngine

    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path))
    engine = LocalEngine(EngineConfig(model="smollm2", quantization="int8"),
                         BlendConfig(enabled=True, ratio=0.15, min_tokens=0), SteerConfig(enabled=False, alpha=3.0))

    async def run():
        return await engine.generate([rag_call("Who discovered radium?"),
                                      answer_call("Where was Marie Curie born?", make_chunks(), 8,
                                                  stop=("\n",), steer=True),
                                      LLMCall((("user", "Say hi."),), 4)])

    try:
        results = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert all(r.output_tokens > 0 for r in results)
    assert engine.blend_counters["blended_calls"] == 2 and engine.blend_counters["fallbacks"] == 0
    assert engine.steer_counters["steered_calls"] == 1 and engine.steer_counters["failures"] == 0
    assert "int8" in next(tmp_path.joinpath("kv").iterdir()).name   # its KV is not the fp model's
