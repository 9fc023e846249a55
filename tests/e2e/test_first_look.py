"""The demo's first look in Chromium: from an empty workspace, the leaderboard shows the first model's row while
the worker is still embedding the next models (issue: results as they come, not after the whole demo)."""
from __future__ import annotations

import csv
import io
import time

import pytest

from core import db, jobs
from core.configs import DEMO_MODELS, demo_jobs
from core.workspace import Workspace
from e2e_harness import DATASET, grid_csv, new_page, open_page, problems, serve

pytestmark = pytest.mark.e2e


def test_the_leaderboard_fills_while_the_demo_still_extracts(browser, tmp_path):
    workspace = Workspace.open(tmp_path / "workspace")
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    # The demo's first look on demo-small: each model embeds and scores the eval split alone, one job each.
    first_look = [config for config in demo_jobs(DATASET) if config.kind == "evaluate"]
    assert [config.models for config in first_look] == [(model,) for model in DEMO_MODELS]
    ids = [config.submit(engine).id for config in first_look]

    with serve(workspace.root) as app:
        page = new_page(browser)
        deadline = time.monotonic() + 600
        while not page.locator("[data-testid=stMetric]", has_text="Best single model").count():
            assert time.monotonic() < deadline, "no leaderboard row within 10 minutes"
            open_page(page, app, "Leaderboard")  # a reload, as a user would press F5
            assert problems(page) == [], page.url
        states = [jobs.get_job(engine, job_id).status for job_id in ids]
        table = list(csv.DictReader(io.StringIO(grid_csv(page, "lb:table"))))
    engine.dispose()

    assert states[0] == "done" and {"queued", "running"} & set(states[1:]), states
    done = [model for (model,), state in zip((c.models for c in first_look), states) if state == "done"]
    assert table and {row["method"] for row in table} <= set(done), table  # only models scored so far
    assert all(row["type"] == "single" and 0.0 < float(row["map@k"]) <= 1.0 for row in table), table
