"""Shared fixtures: every test gets its own RAGSERVE_DATA; the real MiniLM tokenizer and
embedder are loaded once per session (a few seconds) and only by tests that ask for them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Nothing may be fetched from a hub; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Test modules import `retrieval_factories` from this folder under any pytest import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("RAGSERVE_DATA", str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from ragserve.retrieval.embeddings import packaged_model_path

    return AutoTokenizer.from_pretrained(str(packaged_model_path()), local_files_only=True)


@pytest.fixture(scope="session")
def embedder():
    from ragserve.retrieval.embeddings import Embedder

    return Embedder()
