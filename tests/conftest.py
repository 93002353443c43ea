"""Shared fixtures. Model weights convert once into RAGSERVE_CACHE (default ~/.cache/ragserve)
and are reused across runs; collections go to per-session temp dirs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _git_status() -> str | None:
    """`git status --porcelain` of the checkout; None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def pytest_sessionstart(session):
    session.config._ragserve_git_status = _git_status()


def pytest_sessionfinish(session, exitstatus):
    """A test run must leave the checkout as it found it: outputs belong in temp dirs."""
    before = getattr(session.config, "_ragserve_git_status", None)
    after = _git_status() if before is not None else None
    if before is None or after is None or after == before:
        return
    changed = sorted(set(after.splitlines()) - set(before.splitlines()))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the test run changed the checkout (write outputs to tmp_path instead):\n  " + "\n  ".join(changed)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

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


SMALL_SQUAD_PASSAGES = 40   # the first passages of the squad corpus: two articles, ~60 chunks


@pytest.fixture(scope="session")
def small_squad(session_data_dir, tmp_path_factory) -> str:
    """A real collection of the first squad passages, chunked in SmolLM2 tokens.

    Sets RAGSERVE_DATA for the session (tests that monkeypatch it get it restored)."""
    from ragserve.engines.local.models import load_tokenizer
    from ragserve.retrieval.embeddings import Embedder
    from ragserve.retrieval.ingest import ingest

    os.environ["RAGSERVE_DATA"] = str(session_data_dir)
    src = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in squad_rows("corpus", SMALL_SQUAD_PASSAGES)))
    ingest(src, "squad-small", load_tokenizer("smollm2"), shared_embedder(), progress=False)
    return "squad-small"


_EMBEDDER = None


def shared_embedder():
    global _EMBEDDER
    if _EMBEDDER is None:
        from ragserve.retrieval.embeddings import Embedder

        _EMBEDDER = Embedder()
    return _EMBEDDER
