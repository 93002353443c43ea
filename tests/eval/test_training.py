"""Learned profiler: label mapping, train on synthetic tuning records -> save -> load -> profile."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ragserve.errors import ConfigError, NotFound
from ragserve.eval.training import (ProfileLabel, covers, label_from_plan, summary_range_from, train_profiler,
                                    training_query_ids)
from ragserve.eval.tuning import append_record, write_meta
from ragserve.metis.learned import CachedQueryEmbedder, FeatureSpec, featurize, load_profiler, question_word
from ragserve.metis.profile import Complexity, LearnedProfiler, ProfileSource, QueryProfile
from tests.eval.factories import FakeEmbedder, make_record, plan
from tests.eval.test_tuning import make_meta

GRID = ("map_rerank:1", "stuff:6", "map_reduce:6:96")
TOPICS = (("who", "when"), ("compare", "both"), ("why", "summarize"))


def synthetic_profile(tmp_path, n_per_kind: int = 8):
    """Tuned records where 'who/when' questions are best with map_rerank:1, 'compare/both'
    with stuff:6 and 'why/summarize' with map_reduce:6:96."""
    write_meta(tmp_path, make_meta(grid=tuple(plan(p) for p in GRID)))
    kinds = [("Who founded company {i}?", "map_rerank:1"), ("Compare the revenue of firm {i} and firm {j}.", "stuff:6"),
             ("Why did the margin of segment {i} fall, and summarize the causes?", "map_reduce:6:96")]
    for k, (template, winner) in enumerate(kinds):
        for i in range(n_per_kind):
            qid = f"k{k}-{i}"
            question = template.format(i=i, j=i + 1)
            for p, lat in zip(GRID, (0.5, 2.0, 8.0)):
                append_record(tmp_path, make_record(qid, p, 1.0 if p == winner else 0.2, lat, question=question))
    return tmp_path


def test_label_mapping_inverts_metis_rules():
    assert label_from_plan(plan("map_rerank:1")) == ProfileLabel("map_rerank", 1, None)
    for chunks, pieces in ((1, 1), (2, 1), (3, 2), (6, 3), (10, 5), (30, 10)):
        label = label_from_plan(plan(f"stuff:{chunks}"))
        assert label.pieces == pieces and pieces <= chunks <= 3 * pieces   # [p, 3p] holds the chunks
    mr = label_from_plan(plan("map_reduce:6:96"))
    assert mr.method == "map_reduce" and mr.summary_words == round(96 / 1.3)
    assert label_from_plan(plan("refine:4:64")).method == "map_reduce"
    assert summary_range_from([mr, label_from_plan(plan("map_reduce:3:48"))]) == (37, 74)
    assert summary_range_from([label_from_plan(plan("stuff:2"))]) == (30, 60)


def test_every_label_is_covered_by_its_own_pruned_space():
    for text in ("map_rerank:1", "map_rerank:6", "stuff:1", "stuff:10", "map_reduce:3:48", "map_reduce:6:96"):
        p = plan(text)
        label = label_from_plan(p)
        joint = label.method != "map_rerank"
        complexity = Complexity.HIGH if label.method == "map_reduce" else Complexity.LOW
        assert covers(QueryProfile(complexity, joint, label.pieces, (30, 200)), p, 10), text


def test_text_features():
    assert question_word("In which year did it open?") == "which"
    assert question_word("Summarize the meeting") == "summarize"
    assert question_word("Is the sky blue?") == "yesno"
    spec = FeatureSpec("fake", 4)
    x = featurize(["Why and how?", "Compare A and B in 2019"], spec, np.zeros((2, 4)))
    assert x.shape == (2, spec.dim) and x.dtype == np.float32
    names = list(spec.text_features)
    row = dict(zip(names, x[1, 4:]))
    assert row["count_and"] == 1 and row["count_compare"] == 1 and row["digits"] == 4


def test_train_save_load_profile_round_trip(tmp_path):
    src = synthetic_profile(tmp_path / "profiles")
    embedder = FakeEmbedder(TOPICS)
    model, report = train_profiler([src], out=tmp_path / "learned", embedder=embedder)
    assert report["num_queries"] == 24
    assert report["label_counts"]["method"] == {"map_rerank": 8, "stuff": 8, "map_reduce": 8}
    cv = report["cross_validation"]
    assert cv["folds"] == 5 and cv["method_accuracy"] >= 0.9 and cv["coverage"] >= 0.9
    spec = json.loads((tmp_path / "learned" / "profiler.json").read_text())
    assert spec["format_version"] == 1 and spec["feature_spec"]["embedding_model"] == FakeEmbedder.model_id
    assert spec["sklearn_version"] and spec["training"]["num_queries"] == 24
    assert training_query_ids(tmp_path / "learned") == {f"k{k}-{i}" for k in range(3) for i in range(8)}

    loaded = load_profiler(tmp_path / "learned", embedder=embedder)
    assert isinstance(loaded, LearnedProfiler)
    for query, joint, complexity in (("Who founded company 99?", False, Complexity.LOW),
                                     ("Compare the revenue of firm 5 and firm 7.", True, Complexity.LOW),
                                     ("Why did sales drop? summarize the reasons", True, Complexity.HIGH)):
        prof = loaded.profile(query)
        assert prof == model.profile(query)           # the saved model answers as the trained one
        assert prof.source is ProfileSource.LEARNED and 0.0 <= prof.confidence <= 1.0
        assert (prof.joint_reasoning, prof.complexity) == (joint, complexity), query
    assert loaded.profile("Why did sales drop? summarize").summary_range == (74, 74)
    inference = report["inference"]
    print(f"\nlearned profiler inference (fake embedder): {inference}")
    assert inference["classifier_only"]["p50_ms"] > 0   # measured, not bounded: timing is reported


def test_single_class_training_gives_a_constant_confident_profiler(tmp_path):
    write_meta(tmp_path, make_meta(grid=(plan("stuff:2"),)))
    for i in range(5):
        append_record(tmp_path, make_record(f"q{i}", "stuff:2", 1.0, 1.0, question=f"What is {i}?"))
    model, report = train_profiler([tmp_path], embedder=FakeEmbedder())
    prof = model.profile("anything at all?")
    assert (prof.joint_reasoning, prof.complexity, prof.pieces, prof.confidence) == (True, Complexity.LOW, 1, 1.0)
    assert (tmp_path / "learned" / "model.joblib").is_file()


def test_load_errors(tmp_path):
    with pytest.raises(NotFound):
        load_profiler(tmp_path)
    src = synthetic_profile(tmp_path / "p", n_per_kind=2)
    train_profiler([src], out=tmp_path / "m", embedder=FakeEmbedder(TOPICS))

    class Other(FakeEmbedder):
        model_id = "another/model"
    with pytest.raises(ConfigError, match="embeddings"):
        load_profiler(tmp_path / "m", embedder=Other())


def test_cached_query_embedder_embeds_each_query_once():
    inner = FakeEmbedder()
    cached = CachedQueryEmbedder(inner, max_entries=2)
    a = cached.encode_query("a")
    assert np.array_equal(cached.encode_query("a"), a) and inner.calls == 1
    cached.encode_query("b"), cached.encode_query("c")     # evicts "a"
    cached.encode_query("a")
    assert inner.calls == 4 and cached.model_id == inner.model_id and cached.dim == inner.dim
