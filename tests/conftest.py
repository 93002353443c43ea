"""Shared fixtures. Model weights convert once into RAGSERVE_CACHE (default ~/.cache/ragserve)
and are reused across runs; collections go to per-session temp dirs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SQUAD = Path(__file__).resolve().parents[1].parent / "shared/datasets/squad"


def squad_rows(kind: str, n: int) -> list[dict]:
    from ragserve.config import datasets_dir

    path = datasets_dir() / "squad" / f"{kind}.jsonl"
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ragserve-data")


@pytest.fixture(scope="session")
def smollm2_engine():
    """One SmolLM2 engine for the session (loading costs a few seconds)."""
    import asyncio

    from ragserve.config import EngineConfig
    from ragserve.engines.local.engine import LocalEngine

    engine = LocalEngine(EngineConfig(model="smollm2"))
    yield engine
    asyncio.run(engine.close())
