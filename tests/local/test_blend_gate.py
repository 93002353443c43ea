"""CacheBlend token selection knobs and the quality gate.

Selection: forced tokens (chunk sinks / boundaries) and the deviation-mass ratio on small
tensors. Gate: on SmolLM2 fp32 it passes a correct blend and refuses one whose stored keys are
rotated twice (the blended KV then sits at the wrong positions); the engine follows a
stored verdict: the gate's ratio, a refusal (visible in its policy and counters), or the
configured ratio when the collection was never checked.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from ragserve.config import BlendConfig, EngineConfig
from ragserve.domain import Chunk
from ragserve.engines.local.blend import forced_tokens
from ragserve.engines.local.blend_forward import LayerwiseModel
from ragserve.engines.local.blend_gate import (BlendGate, GatePoint, GateThresholds, GateVerdict, check,
                                               load_verdict, save_verdict, selection)
from ragserve.engines.local.kv_store import KVSpec, KVStore
from ragserve.engines.local.segments import CHUNK, GLUE, PREFIX, SUFFIX, Segment, SegmentedPrompt
from ragserve.metis.planner import collection_blend_fraction
from ragserve.synthesis import answer_call


def make_prompt() -> SegmentedPrompt:
    segs = (Segment(0, 4, PREFIX), Segment(4, 10, CHUNK), Segment(10, 11, GLUE), Segment(11, 17, CHUNK),
            Segment(17, 20, SUFFIX))
    return SegmentedPrompt(tuple(range(20)), segs, tuple(range(4)))


def test_forced_tokens_are_each_chunks_first_and_last():
    forced = forced_tokens(make_prompt(), 2, 1)
    assert forced.nonzero().flatten().tolist() == [4, 5, 9, 11, 12, 16]
    assert forced_tokens(make_prompt(), 0, 0) is None


def test_select_keeps_forced_then_top_deviation_within_budget():
    T = 10
    reused = torch.tensor([True] * 8 + [False] * 2)
    old = torch.zeros(1, T, 2)
    k = torch.zeros(1, 1, T, 2)
    k[0, 0, :, 0] = torch.tensor([0., 5, 4, 3, 2, 1, 0, 0, 0, 0])   # deviation ranks 1 > 2 > 3 ...
    forced = torch.zeros(T, dtype=torch.bool)
    forced[7] = True                                              # zero deviation, kept anyway
    keep = LayerwiseModel._select(k, old, reused, None, 0.25, 8, forced)   # budget 2 of 8
    assert keep.tolist() == [1, 7, 8, 9]                          # top-1, forced, the 2 fresh
    keep = LayerwiseModel._select(k, old, reused, None, 0.25, 8)
    assert keep.tolist() == [1, 2, 8, 9]


def test_deviation_mass_shrinks_the_ratio_to_what_covers_the_mass():
    T = 8
    reused = torch.ones(T, dtype=torch.bool)
    old = torch.zeros(1, T, 1)
    k = torch.zeros(1, 1, T, 1)
    k[0, 0, :, 0] = torch.tensor([10., 1, 1, 1, 1, 1, 1, 1]).sqrt()  # one token holds 10/17 of the mass
    keep = LayerwiseModel._select(k, old, reused, None, 0.5, T, None, 0.5)
    assert keep.tolist() == [0]                                    # cap 4, mass 50% needs 1
    keep = LayerwiseModel._select(k, old, reused, None, 0.25, T, None, 0.99)
    assert len(keep) == 2                                          # the cap binds


def test_blend_config_validates_the_new_knobs():
    from ragserve.errors import ConfigError

    with pytest.raises(ConfigError, match="sink_tokens"):
        BlendConfig(sink_tokens=-1)
    with pytest.raises(ConfigError, match="deviation_mass"):
        BlendConfig(deviation_mass=1.5)


# -- the gate's policy (no model) ---------------------------------------------------------
def fake_store(tmp_path) -> KVStore:
    return KVStore(tmp_path, KVSpec("fake-model", torch.float32, 2, 1, 4), write_behind=False)


def verdict(config: BlendConfig, ratio: float | None, collection: str = "docs") -> GateVerdict:
    points = (GatePoint(0.1, 0.5, 0.5, False), GatePoint(0.3, 0.1 if ratio else 0.4, 0.9 if ratio else 0.6,
                                                         ratio is not None))
    return GateVerdict("fake-model", collection, selection(config), 8, GateThresholds(), points, ratio)


def test_gate_policy_follows_the_stored_verdict(tmp_path):
    store, config = fake_store(tmp_path), BlendConfig(enabled=True, ratio=0.15)
    save_verdict(store, verdict(config, 0.3, "good"))
    save_verdict(store, verdict(config, None, "bad"))
    save_verdict(store, verdict(BlendConfig(sink_tokens=0), 0.1, "other"))
    assert load_verdict(store, "good").ratio == 0.3
    gate = BlendGate(store, config)
    assert gate.policy("good").ratio == 0.3 and gate.policy("good").source == "gate"
    bad = gate.policy("bad")
    assert not bad.blend and "refused" in bad.reason and "0.3" in bad.reason
    other = gate.policy("other")                      # measured with other selection knobs
    assert other.blend and other.ratio == 0.15 and other.source == "config"
    assert gate.policy("never-checked").source == "config"
    assert gate.policy("").ratio == 0.15
    assert set(gate.policies()) == {"good", "bad", "other", "never-checked", ""}


# -- on SmolLM2 -----------------------------------------------------------------------------
TEXTS = [
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
     "She was the first woman to win a Nobel Prize, in physics in 1903 and in chemistry in 1911."),
    ("Warsaw", "Warsaw is the capital and largest city of Poland. It stands on the Vistula River in "
     "east-central Poland. Marie Curie was born in Warsaw in 1867 and studied there."),
    ("Radium", "Radium is a chemical element with the symbol Ra and atomic number 88. It was discovered by "
     "Marie and Pierre Curie in 1898 from the mineral uraninite."),
    ("Vistula", "The Vistula is the longest river in Poland, flowing 1,047 kilometres from the Carpathian "
     "Mountains to the Baltic Sea near Gdansk, through Krakow and Warsaw."),
    ("Nobel Prize", "The Nobel Prizes are awarded each year in Stockholm for physics, chemistry, medicine, "
     "literature and peace, following the will of Alfred Nobel, who invented dynamite."),
]


def make_chunks() -> list[Chunk]:
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=t, num_tokens=0, title=title) for i, (title, t) in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragserve.engines.local.models import model_dir

    path = model_dir("smollm2")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def squad_chunks(n: int) -> list[Chunk]:
    """Real passages (~150 tokens each): RAG-sized prompts, where misplaced keys matter."""
    from tests.conftest import squad_rows

    return [Chunk(id=r["id"], doc_id=r["id"], text=r["text"], num_tokens=0, title=r["title"])
            for r in squad_rows("corpus", n)]


@pytest.mark.model
def test_gate_passes_a_correct_blend_and_refuses_misrotated_keys(smol, tmp_path):
    """Keys rotated twice (stored post-RoPE, then re-aligned again) garble every ratio below 1:
    refused. Keys left unrotated hurt far less on SmolLM2 at these lengths (first-token KL
    ~0.06 at r = 0.3, 10x a correct blend's): the gate sees it, but only a strict bound refuses it."""
    from ragserve.engines.local.blend import Blender, kv_spec

    tok, model = smol
    blender = Blender(model, KVStore(tmp_path, kv_spec(model, "smollm2-gate"), write_behind=False))
    config = BlendConfig(enabled=True)
    kwargs = dict(num_prompts=4, chunks_per_prompt=4)
    chunks = squad_chunks(12)
    good = check(blender, tok, "docs", chunks, config, ratios=(0.3,), **kwargs)
    assert good.ratio == 0.3, good

    place = blender.lw.place
    blender.lw.place = lambda keys, positions: keys   # stored keys keep their positions 0..n
    unrotated = check(blender, tok, "docs", chunks, config, ratios=(0.3,), **kwargs)
    assert unrotated.points[0].kl > 3 * good.points[0].kl

    blender.lw.place = lambda keys, positions: place(place(keys, positions), positions)
    broken = check(blender, tok, "docs", chunks, config, ratios=(0.15, 0.3, 0.5), **kwargs)
    assert broken.ratio is None, broken
    save_verdict(blender.store, broken)
    policy = BlendGate(blender.store, config).policy("docs")
    assert not policy.blend and "refused" in policy.reason


@pytest.mark.model
def test_engine_refuses_blending_for_a_refused_collection(tmp_path, monkeypatch):
    from ragserve.engines.local.engine import LocalEngine

    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path))
    config = BlendConfig(enabled=True, min_tokens=0)
    engine = LocalEngine(EngineConfig(model="smollm2"), blend=config)
    try:
        assert engine.blender is not None
        save_verdict(engine.blender.store, verdict(config, None, "bad"))
        save_verdict(engine.blender.store, verdict(config, 0.3, "good"))

        async def ask(collection: str):
            call = answer_call("Where was Marie Curie born?", make_chunks()[:3], max_tokens=4, stop=("\n",))
            from dataclasses import replace

            return (await engine.generate([replace(call, collection=collection)]))[0]

        asyncio.run(ask("bad"))
        assert engine.blend_counters["refused_calls"] == 1 and engine.blend_counters["blended_calls"] == 0
        asyncio.run(ask("good"))
        assert engine.blend_counters["blended_calls"] == 1
        stats = engine.blend_stats()
        assert stats["policies"]["bad"]["blend"] is False and stats["policies"]["good"]["ratio"] == 0.3
        # the planners price each collection's stuff calls at what the engine will prefill
        assert collection_blend_fraction(engine, "bad") == 1.0
        assert collection_blend_fraction(engine, "good") == 0.3
        assert collection_blend_fraction(engine, "never-checked") == config.ratio
    finally:
        asyncio.run(engine.close())


def test_http_stats_show_the_engines_blend_policies():
    from types import SimpleNamespace

    from ragserve.domain import EngineStats
    from ragserve.server.routes_health import stats_snapshot

    blend = {"enabled": True, "refused_calls": 1,
             "policies": {"bad": {"blend": False, "ratio": 0.15, "source": "gate", "reason": "blend gate refused"}}}
    engine = SimpleNamespace(stats=lambda: EngineStats(kv_capacity_tokens=10, kv_used_tokens=0, num_running=0,
                                                       num_waiting=0, kv_bytes_per_token=1),
                             blend_stats=lambda: blend)
    counter = SimpleNamespace(in_flight=0, limit=1, num_rejected=0)
    state = SimpleNamespace(runtime=SimpleNamespace(engine=engine, planner=None), started_at=0.0, ready=True,
                            config=SimpleNamespace(engine=SimpleNamespace(model="smollm2")), queries=counter,
                            ingests=counter, metrics=SimpleNamespace(num_queries=0, num_cancelled={}))
    assert stats_snapshot(state)["blend"]["policies"]["bad"]["blend"] is False
