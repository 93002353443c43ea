"""End to end in a real browser: `ragserve ui` served on 127.0.0.1, driven by headless
Chromium (Debian's, through Playwright) against a real `ragserve serve`.

Loads a result set by path, checks the frontier chart renders (and its hover), asks a
question and waits for the answer. Screenshots (ui_*.png) go to a temp dir, or to
RAGSERVE_SCREENSHOTS when set (e.g. eval/results, to refresh the committed ones).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port
from tests.ui.conftest import EVAL_RUN, QUESTION, REPO

pytestmark = [pytest.mark.model, pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_START_TIMEOUT_S = 120
QUERY_TIMEOUT_MS = 300_000
VIEWPORT = {"width": 1400, "height": 1000}
TALL = {"width": 1400, "height": 2200}   # Streamlit scrolls inside the page: full_page sees the viewport


@pytest.fixture
def ui_url(ui_server, tmp_path):
    """`ragserve ui --port P --server-url <ui_server>` in a subprocess; its URL."""
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}   # streamlit's ~/.streamlit
    proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli", "ui", "--port", str(port),
                             "--server-url", ui_server.url], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "streamlit.log").read_text()
            try:
                if httpx.get(url + "/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            log_text = (tmp_path / "streamlit.log").read_text()
            assert time.monotonic() < deadline, "streamlit did not come up:\n" + log_text
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def page(tmp_path):
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):   # CI installs it (scripts/setup.sh): a skip there would hide a failure
            pytest.fail(f"{CHROMIUM} is missing in CI: scripts/setup.sh should have installed chromium")
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install chromium` (scripts/setup.sh does)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        # A persistent context is Chromium with a fresh --user-data-dir; headless=True adds --headless.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=[f for f in CHROMIUM_FLAGS if f != "--headless"], viewport=VIEWPORT)
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the screenshots go: never into the checkout unless asked (a test run leaves it clean)."""
    path = Path(os.environ.get("RAGSERVE_SCREENSHOTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def visible(page, selector: str):
    return page.locator(f"{selector} >> visible=true")


def test_explorer_in_chromium(ui_url, page, tmp_path, screenshots):
    run = tmp_path / "results" / "smoke-squad-copy"
    shutil.copytree(EVAL_RUN, run)
    page.goto(ui_url, wait_until="domcontentloaded")
    page.get_by_text("quality–latency explorer").wait_for(timeout=60_000)
    page.get_by_text("ready", exact=False).first.wait_for(timeout=60_000)   # the sidebar reached the server

    # 1. Load a result set by path (after removing the one it opens on); the chart shows it
    #    with its frontier, and hovering a point shows its plan and example queries.
    sources = page.locator("[data-testid='stMultiSelect']").first
    sources.locator("button[aria-label^='Remove ']").first.click()
    page.get_by_text("Choose a result set").wait_for(timeout=60_000)
    box = visible(page, "input[aria-label='Another result directory (an eval run or a tuning sweep)']")
    box.fill(str(run))
    box.press("Enter")
    page.get_by_text(f"{run}: eval run, squad/smollm2, 30 rows", exact=False).wait_for(timeout=60_000)
    chart = page.locator("[data-testid='stPlotlyChart']").first
    chart.locator("text.legendtext", has_text="Pareto frontier").wait_for(timeout=60_000)
    assert chart.locator("text.legendtext", has_text="metis").count() == 1
    report = json.loads((run / "report.json").read_text())
    for name in report["pareto_frontier"]:   # the frontier the eval report computed is labelled
        chart.locator(".textpoint", has_text=name.removeprefix("fixed:")).first.wait_for(timeout=10_000)
    page.set_viewport_size(TALL)   # the whole page in the screenshot, and every point on screen
    point = chart.locator(".scatterlayer .trace .points path").first
    point.scroll_into_view_if_needed()   # the mouse hovers only what is on screen
    bbox = point.bounding_box()
    page.mouse.move(bbox["x"] + bbox["width"] / 2, bbox["y"] + bbox["height"] / 2)
    hover = chart.locator(".hoverlayer .hovertext", has_text="examples:")
    hover.wait_for(timeout=10_000)
    assert "plan: " in (hover.text_content() or "")
    page.screenshot(path=str(screenshots / "ui_tradeoff.png"), full_page=True)
    page.set_viewport_size(VIEWPORT)

    # 2. Ask a question on the server; METIS plans it and the answer streams in.
    page.get_by_role("tab", name="Try a query").click()
    question = visible(page, "textarea[aria-label='Question']")
    question.fill(QUESTION)
    question.press("Control+Enter")
    visible(page, "button:has-text('Ask')").click()
    page.get_by_text("Where the time went").wait_for(timeout=QUERY_TIMEOUT_MS)
    answer = page.locator(".st-key-query_answer").inner_text().strip()
    assert answer and "retrieving" not in answer
    assert visible(page, "[data-testid='stMetricLabel']:has-text('Chosen plan')").count() == 1
    assert re.search(r"METIS chose \S+", page.locator("body").inner_text())
    page.set_viewport_size(TALL)
    page.screenshot(path=str(screenshots / "ui_query.png"), full_page=True)
