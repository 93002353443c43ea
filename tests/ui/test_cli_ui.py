"""`ragserve ui`: the streamlit command it runs, and the options ui/app.py reads from it."""
from __future__ import annotations

import sys

from ragserve.cli import _parser, ui_command
from tests.ui.conftest import APP


def test_ui_command_runs_streamlit_on_the_app_with_its_options():
    args = _parser().parse_args(["ui", "--port", "9999", "--server-url", "http://127.0.0.1:1",
                                 "--config", "my.yaml"])
    cmd = ui_command(args)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP)]
    assert cmd[cmd.index("--server.port") + 1] == "9999"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--") + 1:] == ["--server-url", "http://127.0.0.1:1", "--config", "my.yaml"]


def test_ui_command_defaults():
    cmd = ui_command(_parser().parse_args(["ui"]))
    assert cmd[cmd.index("--server.port") + 1] == "8501" and cmd[-1] == "--"


def test_the_app_takes_the_server_url_from_its_command_line(app, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(APP), "--server-url", "http://127.0.0.1:1"])
    at = app()
    assert at.text_input(key="server_url").value == "http://127.0.0.1:1"
    assert any("http://127.0.0.1:1" in e.value for e in at.tabs[1].error)


def test_a_server_url_that_is_not_http_is_refused_with_a_message(app):
    at = app()
    at.text_input(key="server_url").set_value("localhost:8000").run()
    assert not at.exception
    assert "not an http(s) URL" in at.tabs[1].error[0].value
    at.text_input(key="server_url").set_value("").run()
    assert not at.exception and "not an http(s) URL" in at.tabs[1].error[0].value
