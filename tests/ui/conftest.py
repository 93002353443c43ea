"""Fixtures of the explorer's tests: the real result files of the repo, the in-process
controller on the session's SmolLM2 engine, and a real `ragserve serve` on loopback.

`inprocess` is installed as the app's in-process backend, as `ragserve ui` would build
it, but on the shared engine (one model load per test session). `ui_server` is shared by
the server-mode AppTests and the browser test.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

from tests.conftest import shared_embedder

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "ui" / "app.py"
EVAL_RUN = REPO / "eval" / "results" / "smoke-squad"
SWEEP = REPO / "profiles" / "smollm2" / "squad"
LEARNED = SWEEP / "learned"
APP_TIMEOUT_S = 60        # one rerun without a query
QUERY_TIMEOUT_S = 300     # a rerun that answers queries on a busy 2-core machine
QUESTION = "When did the 1973 oil crisis begin?"


def ui_config():
    from ragserve.config import Config, MetisConfig, SynthesisConfig

    # Short answers and the repo's learned profiler (trained on profiles/smollm2/squad): METIS
    # still profiles, prunes and schedules, without an LLM profiler call per query.
    return Config(synthesis=SynthesisConfig(answer_tokens=12),
                  metis=MetisConfig(feedback_every=0, learned_profiler=str(LEARNED)))


@pytest.fixture(scope="session")
def inprocess(small_squad, smollm2_engine):
    """The app's in-process backend: METIS + controller on the shared SmolLM2 engine. Its
    factory builds the CacheBlend variant (a second engine) when Compare asks for it."""
    from dataclasses import replace

    from ragserve.config import BlendConfig
    from ragserve.controller import Controller
    from ragserve.engines.local.engine import LocalEngine
    from ragserve.metis.learned import CachedQueryEmbedder, load_profiler
    from ragserve.metis.planner import MetisPlanner
    from ragserve.retrieval.ingest import Retriever
    from ragserve.runtime import DEFAULT_PLAN
    from ui.backend import InProcessBackend
    from ui.registry import set_inprocess

    config = ui_config()
    embedder = CachedQueryEmbedder(shared_embedder())
    retriever = Retriever(embedder)
    learned = load_profiler(LEARNED, embedder=embedder)
    planner = MetisPlanner(smollm2_engine, config, learned=learned)
    owned: list = [planner]

    def factory(blend: bool) -> Controller:
        variant = replace(config, blend=BlendConfig(enabled=blend))
        engine = LocalEngine(variant.engine, blend=variant.blend)
        blend_planner = MetisPlanner(engine, variant, learned=learned)
        owned.extend([blend_planner, engine])
        return Controller(engine, retriever, variant, planner=blend_planner, default_plan=DEFAULT_PLAN)

    controller = Controller(smollm2_engine, retriever, config, planner=planner, default_plan=DEFAULT_PLAN)
    backend = InProcessBackend({False: controller}, factory, owned)
    set_inprocess(backend)
    yield backend
    set_inprocess(None)
    backend.close()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """A real `ragserve serve` (SmolLM2) on a free loopback port with a small squad collection."""
    from tests.server.conftest import BASE_CONFIG, merge, running_server

    config = merge(BASE_CONFIG, {"metis": {"learned_profiler": str(LEARNED)}})
    with running_server(tmp_path_factory.mktemp("ui-server"), config) as proc:
        yield proc


@pytest.fixture
def app() -> Callable[[], AppTest]:
    """A fresh AppTest of ui/app.py, already run once."""
    from streamlit.testing.v1 import AppTest

    def make() -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S)
        return at.run()
    return make
