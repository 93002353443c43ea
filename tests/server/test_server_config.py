"""The server section of the config: YAML/TOML files, env keys, validation (no model)."""
from __future__ import annotations

import pytest

from ragserve.config import Config, ServerConfig
from ragserve.errors import ConfigError


def test_yaml_and_toml_give_the_same_settings(tmp_path):
    (tmp_path / "c.yaml").write_text("server:\n  port: 9001\n  api_keys: [k1]\n  max_queue: 4\n")
    (tmp_path / "c.toml").write_text('[server]\nport = 9001\napi_keys = ["k1"]\nmax_queue = 4\n')
    assert Config.load(tmp_path / "c.yaml") == Config.load(tmp_path / "c.toml")
    assert Config.load(tmp_path / "c.toml").server.api_keys == ("k1",)


@pytest.mark.parametrize("text,needle", [
    ("server:\n  prot: 1\n", "server.prot"),
    ("sever:\n  port: 1\n", "sever"),
    ("server:\n  port: 70000\n", "server.port"),
    ("server:\n  max_queue: 0\n", "server.max_queue"),
    ("server:\n  request_timeout_s: -1\n", "server.request_timeout_s"),
    ("server:\n  api_keys: ['']\n", "api_keys"),
    ("server: [1, 2\n", "not valid YAML"),
])
def test_bad_settings_name_the_field(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        Config.load(path)


def test_env_keys_are_added(monkeypatch):
    monkeypatch.setenv("RAGSERVE_API_KEYS", " a, b ,,k1")
    server = ServerConfig(api_keys=("k1",)).with_env()
    assert server.api_keys == ("k1", "a", "b")


def test_serve_accepts_config_after_the_subcommand():
    from ragserve.cli import _parser

    args = _parser().parse_args(["serve", "--config", "x.yaml", "--port", "9000"])
    assert args.config == "x.yaml" and args.port == 9000 and args.host is None
    assert _parser().parse_args(["--config", "y.yaml", "serve"]).config == "y.yaml"


def _serve(tmp_path, *args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RAGSERVE_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ragserve.cli", "serve", *args], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_busy_port_fails_before_the_model_loads(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve(tmp_path, "--host", "127.0.0.1", "--port", str(port))
    assert out.returncode == 2
    assert f"127.0.0.1:{port} is in use by another process; choose another port" in out.stderr
    # nothing was loaded: no engine, model or index log line came before the error
    assert "ragserve.engines" not in out.stderr and "ragserve.runtime" not in out.stderr
    assert "Loading checkpoint" not in out.stderr and "ragserve ready" not in out.stderr


def test_config_error_comes_before_any_loader_log(tmp_path):
    (tmp_path / "bad.yaml").write_text("server:\n  prot: 1\n")
    out = _serve(tmp_path, "--config", str(tmp_path / "bad.yaml"))
    assert out.returncode == 2
    assert out.stderr.startswith("ragserve: error: ") and "server.prot" in out.stderr
    assert "faiss" not in out.stderr.lower()
