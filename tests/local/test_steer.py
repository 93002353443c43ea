"""LLMSteer on SmolLM2 (fp32): alpha = 1 is a no-op, the steering set is query-independent
and stable, scores are stored with the chunk KV, steering composes with CacheBlend, and the
per-query flag reaches the engine's calls."""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from ragserve.config import BlendConfig, ConfigError, EngineConfig, SteerConfig, SynthesisConfig
from ragserve.domain import Chunk, LLMCall, Method, RagPlan
from ragserve.engines.local.blend import Blender, kv_spec
from ragserve.engines.local.kv_store import KVStore
from ragserve.engines.local.models import model_dir
from ragserve.engines.local.runner import ModelRunner
from ragserve.engines.local.segments import CHUNK, SegmentedPrompt, segment_call
from ragserve.engines.local.steer import SteerBatch, Steerer, SteerRow, head_prompt, select
from ragserve.synthesis import answer_call, build_program

PASSAGES = [
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on "
     "radioactivity. She was the first woman to win a Nobel Prize."),
    ("Warsaw", "Warsaw is the capital and largest city of Poland. Marie Curie was born in Warsaw in 1867."),
    ("Radium", "Radium is a chemical element with the symbol Ra. It was discovered by Marie and Pierre "
     "Curie in 1898 from the mineral uraninite."),
]


def make_chunks() -> list[Chunk]:
    return [Chunk(id=f"c{i}", doc_id=f"d{i}", text=text, num_tokens=0, title=title)
            for i, (title, text) in enumerate(PASSAGES)]


def make_prompt(runner: ModelRunner, question: str, chunks: list[Chunk] | None = None) -> SegmentedPrompt:
    prompt = segment_call(runner.tokenizer, answer_call(question, chunks or make_chunks(), max_tokens=8))
    assert prompt is not None
    return prompt


def make_steerer(runner: ModelRunner, root, **config) -> Steerer:
    store = KVStore(root, kv_spec(runner.model, "smollm2-steer-test"), write_behind=False)
    return Steerer(runner.model, runner.tokenizer, store, SteerConfig(**config))


def chunk_sets(prompt: SegmentedPrompt, row: SteerRow) -> list[torch.Tensor]:
    """The steering set of each chunk, relative to the chunk's first token."""
    return [row.keys[:, s.start:s.end] for s in prompt.segments if s.kind == CHUNK]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(model_dir("smollm2"), "smollm2", dtype="fp32")


@pytest.fixture(scope="module")
def unsteered(runner):
    """Logits and KV of a plain sdpa prefill, taken before the model's attention is switched."""
    prompt = make_prompt(runner, "In which city was the discoverer of radium born?")
    kv, logits = runner.prefill([list(prompt.token_ids)])
    return prompt, kv, logits


@pytest.fixture(scope="module")
def steerer(runner, unsteered, tmp_path_factory) -> Steerer:
    return make_steerer(runner, tmp_path_factory.mktemp("kv"), alpha=4.0)


# -- pure -----------------------------------------------------------------------------------
def test_select_keeps_the_intersection_of_both_passes_top_k():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 7.0, 0.0]],      # pass 1 top-3: 0, 1, 3
                           [[9.0, 1.0, 8.0, 7.0, 0.0]]])     # pass 2 top-3: 0, 2, 3
    assert select(scores, 0.6).tolist() == [[True, False, False, True, False]]
    assert select(scores, 0.01).tolist() == [[True, False, False, False, False]]   # k >= 1
    # mean: token j's sum over the n - j queries that see it; the last token wins here
    late = torch.tensor([[[4.0, 3.0, 2.0, 1.5]], [[4.0, 3.0, 2.0, 1.5]]])
    assert select(late, 0.25, "mean").tolist() == [[False, False, False, True]]


def test_steer_config_layers_and_validation():
    assert SteerConfig().layer_indices(4) == (2, 3)                        # default: the upper half
    assert SteerConfig(layers="all").layer_indices(4) == (0, 1, 2, 3)
    assert SteerConfig(layers="0.5:").layer_indices(30) == tuple(range(15, 30))
    assert SteerConfig(layers="-2:").layer_indices(24) == (22, 23)
    assert SteerConfig(layers="1,3").layer_indices(4) == (1, 3)
    for bad in (dict(alpha=0.0), dict(top_fraction=0.0), dict(layers="a:b"), dict(score="max")):
        with pytest.raises(ConfigError):
            SteerConfig(**bad)
    with pytest.raises(ConfigError, match="steer.layers"):
        SteerConfig(layers="40").layer_indices(30)
    assert SteerConfig(collections=["docs"]).steers("docs") and not SteerConfig().steers("docs")


def test_steer_flag_reaches_every_call_over_passages():
    for plan in (RagPlan(Method.STUFF, 2), RagPlan(Method.MAP_RERANK, 2), RagPlan(Method.REFINE, 2, 16)):
        program = build_program("q?", make_chunks(), plan, SynthesisConfig(), steer=True)
        assert all(c.steer is True for c in next(program))
    assert answer_call("q?", make_chunks(), 4).steer is None


def test_controller_resolves_the_query_flag_over_the_collection_default():
    from ragserve.config import Config
    from ragserve.controller import Controller
    from ragserve.domain import LLMResult, RetrievedChunk

    class Engine:
        calls: list[LLMCall] = []

        async def generate(self, calls):
            self.calls.extend(calls)
            return [LLMResult("x", 1, 1, 0.0, 0.0) for _ in calls]

    class Retriever:
        hits = [RetrievedChunk(c, 1.0) for c in make_chunks()]

        def collection(self, name):
            return self.hits

        def retrieve(self, col, question, k, filters=None):
            return self.hits[:k], 0.0

    engine = Engine()
    config = Config.from_dict({"steer": {"collections": ["docs"]}})
    controller = Controller(engine, Retriever(), config, default_plan=RagPlan(Method.STUFF, 2))

    async def ask(collection: str, steer: bool | None) -> bool | None:
        await controller.query("q?", collection, steer=steer)
        return engine.calls[-1].steer
    assert asyncio.run(ask("docs", None)) is True
    assert asyncio.run(ask("other", None)) is False
    assert asyncio.run(ask("docs", False)) is False and asyncio.run(ask("other", True)) is True


def test_batch_layout_right_aligns_rows_and_steers_only_queries_after_start():
    keys = torch.zeros((2, 4), dtype=torch.bool)
    keys[1, 1] = True
    row = SteerRow(keys, start=3, log_alpha=math.log(2.0))
    batch = SteerBatch.build([None, row], seq_lens=[6, 4], num_keys=6, num_queries=6)   # row 1: 2 pads
    assert batch is not None and batch.layers == frozenset({1}) and batch.first == 5
    assert batch.keys[1, 1].tolist() == [False, False, False, True, False, False]
    assert batch.queries.tolist() == [[False], [True]]
    assert SteerBatch.build([None, None], [6, 4], 6, 6) is None


# -- model ------------------------------------------------------------------------------------
@pytest.mark.model
def test_alpha_one_leaves_logits_unchanged(runner, unsteered, steerer):
    prompt, _, logits_ref = unsteered
    row = steerer.row(prompt, SteerConfig(alpha=1.0))
    assert row is not None and row.num_steered > 0
    # Steered rows run sdpa with an additive mask, the context rows as their own slice: other
    # kernels and tilings than one sdpa call, so equal up to float32 summation order (logits O(10)).
    kv, logits = runner.prefill([list(prompt.token_ids)], [row])
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-4)
    kv_plain, _ = runner.prefill([list(prompt.token_ids)])    # the fixture's KV stays untouched
    _, step = runner.decode_step(kv, [int(logits.argmax())], [row])
    _, step_ref = runner.decode_step(kv_plain, [int(logits_ref.argmax())])
    torch.testing.assert_close(step, step_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.model
def test_steering_changes_only_the_question_and_answer(runner, unsteered, steerer):
    prompt, kv_ref, logits_ref = unsteered
    row = steerer.row(prompt)
    kv, logits = runner.prefill([list(prompt.token_ids)], [row])
    assert not torch.allclose(logits, logits_ref, atol=1e-3)
    for got, ref in zip(kv.cache.layers, kv_ref.cache.layers):   # the context's KV stays reusable
        torch.testing.assert_close(got.keys[:, :, :row.start], ref.keys[:, :, :row.start])
        torch.testing.assert_close(got.values[:, :, :row.start], ref.values[:, :, :row.start])


@pytest.mark.model
def test_steered_row_in_a_padded_batch_matches_it_alone(runner, unsteered, steerer):
    prompt, _, _ = unsteered
    short = make_prompt(runner, "Capital of Poland?", make_chunks()[1:2])
    row = steerer.row(prompt)
    _, alone = runner.prefill([list(prompt.token_ids)], [row])
    _, plain_short = runner.prefill([list(short.token_ids)])
    _, both = runner.prefill([list(short.token_ids), list(prompt.token_ids)], [None, row])
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[0], plain_short[0], rtol=1e-4, atol=1e-4)


@pytest.mark.model
def test_selection_is_query_independent_and_stable(runner, tmp_path):
    first = make_steerer(runner, tmp_path / "a")
    second = make_steerer(runner, tmp_path / "b")
    chunks = make_chunks()
    a = make_prompt(runner, "In which city was the discoverer of radium born?", chunks)
    b = make_prompt(runner, "What is the symbol of radium?", chunks[::-1])   # other question, order
    sets_a, sets_b = chunk_sets(a, first.row(a)), chunk_sets(b, second.row(b))
    for x, y in zip(sets_a, sets_b[::-1], strict=True):
        assert torch.equal(x, y)
    seg = next(s for s in a.segments if s.kind == CHUNK)
    assert torch.equal(first.compute_scores(a.ids(seg)), second.compute_scores(a.ids(seg)))
    k = math.ceil(first.config.top_fraction * seg.num_tokens)
    per_layer = sets_a[0].sum(1)
    steered = list(first.layers)
    assert per_layer.max() <= k and (per_layer[steered] > 0).all()
    assert per_layer.sum() == per_layer[steered].sum()                   # nothing on unsteered layers


@pytest.mark.model
def test_scores_are_stored_with_the_chunk_kv_and_reloaded(runner, tmp_path):
    steerer = make_steerer(runner, tmp_path)
    prompt = make_prompt(runner, "Who discovered radium?")
    row = steerer.row(prompt)
    assert steerer.counters.scored_chunks == 3
    files = list(steerer.store.dir.rglob(f"*.{steerer.extra_name}.safetensors"))
    assert len(files) == 3
    again = make_steerer(runner, tmp_path)          # a restart: RAM empty, disk tier kept
    assert torch.equal(again.row(prompt).keys, row.keys)
    assert (again.counters.scored_chunks, again.counters.stored_chunks) == (0, 3)


@pytest.mark.model
def test_blended_context_plus_steered_question_equals_steered_prefill(runner, unsteered, steerer, tmp_path):
    prompt, _, _ = unsteered
    row = steerer.row(prompt)
    _, want = runner.prefill([list(prompt.token_ids)], [row])
    blender = Blender(runner.model, steerer.store)
    head = head_prompt(prompt)
    result = blender.blend(head, BlendConfig(ratio=1.0))
    _, got = runner.extend(result.cache, list(prompt.token_ids), len(head), row)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.model
def test_engine_steers_blended_calls_from_the_stored_set(tmp_path, monkeypatch):
    from ragserve.engines.local.engine import LocalEngine

    monkeypatch.setenv("RAGSERVE_DATA", str(tmp_path))
    engine = LocalEngine(EngineConfig(model="smollm2"), BlendConfig(enabled=True, ratio=0.15, min_tokens=0),
                         SteerConfig(enabled=False, alpha=3.0))

    async def run():
        first = await engine.generate([answer_call("Where was Marie Curie born?", make_chunks(), 8,
                                                   stop=("\n",), steer=True)])
        second = await engine.generate([answer_call("Who discovered radium?", make_chunks(), 8,
                                                    stop=("\n",), steer=True),
                                        LLMCall((("user", "Say hi."),), 4)])   # unsteered neighbour
        return first + second

    try:
        results = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert all(r.output_tokens > 0 for r in results)
    assert engine.blend_counters["blended_calls"] == 2
    counters = engine.steer_counters
    assert counters["steered_calls"] == 2 and counters["failures"] == 0
    assert (counters["scored_chunks"], counters["stored_chunks"]) == (3, 3)   # second call: stored set
    assert len(list(tmp_path.joinpath("kv").rglob("*.steer-*.safetensors"))) == 3
