"""An in-process app over real collections and fakes for the model (no torch, no subprocess):
for HTTP behaviour that does not need answers from a model (errors, listings, damage)."""
from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from fastapi.testclient import TestClient

from ragserve.config import Config, ServerConfig
from ragserve.controller import Controller
from ragserve.domain import LLMResult
from ragserve.domain import EngineStats
from ragserve.retrieval.ingest import Retriever
from ragserve.runtime import Runtime
from ragserve.server.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "retrieval"))
from retrieval_factories import make_chunks, make_spec, make_vectors  # noqa: E402

WRITE_KEY = "in-process-key"


class FakeEmbedder:
    """Matches `make_spec()`: 8-dim vectors, model id "test-embedder"."""

    model_id = "test-embedder"
    dim = 8

    def encode_query(self, text: str) -> np.ndarray:
        return make_vectors(1, seed=len(text))[0]

    def encode(self, texts, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return make_vectors(len(texts), seed=len(texts))


class FakeEngine:
    """Answers with "answer" and a fixed number of tokens; `finish` sets its finish_reason."""

    alive = True

    def __init__(self, finish: str = "stop") -> None:
        self.finish = finish
        self.calls = []

    async def generate(self, calls):
        self.calls.extend(calls)
        return [LLMResult(text="answer", prompt_tokens=10, output_tokens=1, ttft_s=0.01, total_s=0.02,
                          token_logprobs=(-0.1,), finish_reason=self.finish) for _ in calls]

    async def stream_result(self, call):
        """The whole answer as one piece (the Engine protocol's streaming form)."""
        (result,) = await self.generate([call])

        async def pieces():
            yield result.text
        future = asyncio.get_running_loop().create_future()
        future.set_result(result)
        return pieces(), future

    def stats(self) -> EngineStats:
        return EngineStats(kv_capacity_tokens=10_000, kv_used_tokens=0, num_running=0, num_waiting=0)

    async def close(self) -> None:
        pass


def add_collection(name: str, n: int = 4) -> None:
    from ragserve.retrieval.store import Collection

    Collection.create_or_open(name, make_spec()).add(make_chunks(n, doc_id=name), make_vectors(n))


@contextlib.contextmanager
def app_client(engine: FakeEngine | None = None, **server) -> Iterator[TestClient]:
    """A TestClient (lifespan run) over collections in the current RAGSERVE_DATA."""
    config = Config(server=ServerConfig(api_keys=(WRITE_KEY,), **server))
    engine = engine or FakeEngine()
    retriever = Retriever(FakeEmbedder())
    runtime = Runtime(config, Controller(engine, retriever, config), engine, retriever)
    app = create_app(config, runtime=runtime)
    app.state.ragserve.tokenizer = object()   # no model tokenizer: these tests do not ingest text
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
