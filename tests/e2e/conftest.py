"""Browser-test fixtures: one prepared workspace, one worker + dashboard and one Chromium per session.

The workspace is prepared with the CLI (extract, evaluate, sweep, rrf fusion on demo-small) before the app starts;
set E2E_WORKSPACE=/some/dir to keep (and on later runs reuse) it instead of a fresh temporary one.
Screenshots go to test-artifacts/screenshots/ (gitignored); the path is printed at the end of the run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e_harness import CHROMIUM, SCREENSHOTS, chromium, goto, new_page, prepare_workspace, screenshot, serve


@pytest.fixture(scope="session")
def e2e_workspace(tmp_path_factory) -> Path:
    where = os.environ.get("E2E_WORKSPACE")
    return prepare_workspace(Path(where) if where else tmp_path_factory.mktemp("e2e-workspace"))


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def app(e2e_workspace, browser):
    """The dashboard and a worker on the prepared workspace, opened once at / so that app.py's
    st.navigation is what every later page load goes through (see test_fresh_server_deep_link)."""
    with serve(e2e_workspace) as app:
        first = new_page(browser)
        goto(first, app, "", title="Start")
        first.context.close()
        yield app


@pytest.fixture
def page(request, browser, app):
    page = new_page(browser)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:  # what the browser showed when the test failed
        try:
            page.screenshot(path=str(SCREENSHOTS / f"FAILED-{request.node.name}.png"), full_page=True)
        except Exception:  # noqa: BLE001 - a dead page must not hide the test's own failure
            pass
    page.context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def shot(page):
    """shot("03-leaderboard") saves a full-page screenshot under test-artifacts/screenshots/."""
    return lambda name: screenshot(page, SCREENSHOTS / f"{name}.png")


def pytest_terminal_summary(terminalreporter):
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.glob("*.png")):
        terminalreporter.write_sep("-", "e2e screenshots")
        terminalreporter.write_line(f"browser-test screenshots: {SCREENSHOTS.resolve()}")
