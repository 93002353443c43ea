"""Real servers for the HTTP tests: `ragserve serve` in a subprocess on a free loopback
port, with its own RAGSERVE_DATA, SmolLM2 and a tiny squad collection.

`server` is shared by the session (model load costs ~20-40 s on a busy machine); tests
that kill or reconfigure a server start their own with `ServerProcess`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.conftest import squad_rows

WRITE_KEY = "test-writer-key"        # from the config file
ENV_KEY = "test-env-key"             # from RAGSERVE_API_KEYS
COLLECTION = "squad-tiny-fixture"
QUESTION = "When did the 1973 oil crisis begin?"
STARTUP_TIMEOUT_S = 300

BASE_CONFIG: dict[str, Any] = {
    "engine": {"model": "smollm2", "max_batch_size": 8},
    "synthesis": {"answer_tokens": 8},
    "metis": {"feedback_every": 0},
    "server": {"api_keys": [WRITE_KEY], "max_queue": 8, "max_body_bytes": 256 * 1024,
               "max_ingest_queue": 1, "request_timeout_s": 240, "shutdown_timeout_s": 60},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


class ServerProcess:
    """One `ragserve serve` subprocess; logs go to <dir>/server-<n>.log."""

    def __init__(self, workdir: Path, data_dir: Path, config: dict[str, Any]) -> None:
        self.workdir, self.data_dir = workdir, data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / f"config-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        env = {**os.environ, "RAGSERVE_DATA": str(self.data_dir), "RAGSERVE_API_KEYS": ENV_KEY,
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ragserve.cli", "serve", "--config", str(self.config_path),
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
        log.close()
        return self

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def terminate(self, timeout_s: float = 90) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def tiny_documents(n: int, offset: int = 0) -> list[dict[str, Any]]:
    rows = squad_rows("corpus", offset + n)[offset:]
    return [{"id": r["id"], "title": r["title"], "text": r["text"]} for r in rows]


def ingest(url: str, collection: str, docs: list[dict], key: str = WRITE_KEY, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/collections/{collection}/documents", json={"documents": docs},
                      headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


@contextlib.contextmanager
def running_server(workdir: Path, config: dict[str, Any]) -> Iterator[ServerProcess]:
    """A started, ready server whose COLLECTION holds 8 squad passages; terminated on exit."""
    proc = ServerProcess(workdir, workdir / "data", config).start()
    try:
        proc.wait_ready()
        response = ingest(proc.url, COLLECTION, tiny_documents(8))
        assert response.status_code == 200, response.text
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The shared server, with COLLECTION holding 8 squad passages."""
    with running_server(tmp_path_factory.mktemp("server"), BASE_CONFIG) as proc:
        yield proc


@pytest.fixture
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def sse_events(lines) -> list[tuple[str, Any]]:
    """Parse an SSE line stream into (event, data) pairs; data is JSON when it parses."""
    events, name, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except json.JSONDecodeError:
                    value = text
                events.append((name, value))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events
