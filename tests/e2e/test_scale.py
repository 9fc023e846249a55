"""The users' scale in Chromium: 50,000 eval queries in 1,000 classes (bench/synthetic_study.py: small JPEGs,
synthetic embeddings, the real evaluate and weights-chosen-on-train jobs). The query explorer's lists read the per-query scores
stored with the results (nothing searches 50,000 queries in the page) and the embedding map draws all 50,000
points with WebGL. How long each takes is measured by `bench/bench_pages.py --synthetic`, not asserted here.

Set E2E_SCALE_WORKSPACE=/some/dir to keep (and on later runs reuse) the built workspace.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from bench import synthetic_study
from core.cache import EmbeddingCache
from core.datasets import open_dataset
from core.models import cache_key_for
from core.workspace import Workspace
from e2e_harness import grid_csv, map_points, new_page, open_page, problems, serve, show_list

pytestmark = pytest.mark.e2e
CLASSES, PER_CLASS = 1000, 50


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    where = os.environ.get("E2E_SCALE_WORKSPACE")
    root = Path(where) if where else tmp_path_factory.mktemp("scale-workspace")
    source = synthetic_study.build(root, CLASSES, PER_CLASS)
    return Workspace.open(root), source


@pytest.fixture(scope="module")
def scale_page(browser, study):
    workspace, source = study
    with serve(workspace.root, dataset=quote(source, safe=""), worker=False) as app:
        page = new_page(browser, timeout_ms=300_000)
        yield app, page
        page.context.close()


def reference_ap(sims: np.ndarray, labels: np.ndarray, query: int, k: int) -> float:
    """AP@k of one query from its float64 similarities to every row (DESIGN.md: rank by (-similarity, index),
    the query dropped by index, divided by min(k, R))."""
    order = [j for j in np.lexsort((np.arange(len(sims)), -sims)) if j != query][:k]
    relevant = labels[order] == labels[query]
    r = int((labels == labels[query]).sum()) - 1
    hits = np.cumsum(relevant)
    return float((hits / np.arange(1, k + 1))[relevant].sum() / min(k, r))


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_explorer_lists_at_50000_queries_come_from_stored_scores(scale_page, study):
    app, page = scale_page
    workspace, source = study
    ids = synthetic_study.result_ids(workspace.root)
    single, concat = ids[synthetic_study.MODELS[0]], ids[synthetic_study.CONCAT]
    open_page(page, app, "Query explorer", params=f"dataset={quote(source, safe='')}&methods={single},{concat}")
    assert problems(page) == []
    main = page.locator("[data-testid=stMain]")

    show_list(page, "ensemble fixed")
    assert f"AP@{synthetic_study.K} stored with result {concat}" in main.inner_text()
    assert "computed here" not in main.inner_text()
    fixed = rows_of(grid_csv(page, "explorer:list:ensemble fixed"))
    assert len(fixed) == 50 and all(float(r["change"]) > 0 for r in fixed)
    # The top row's APs against float64 brute force over all 50,000 rows (the concat: cos_a + cos_b).
    imageset = open_dataset(source, workspace)
    cache = EmbeddingCache(workspace.embeddings)
    a, b = (cache.get(imageset.fingerprint, cache_key_for(m)).load().astype(np.float64) for m in synthetic_study.MODELS)
    labels, query, k = np.asarray(imageset.labels), int(fixed[0]["id"]), synthetic_study.K
    sims_a, sims_b = a @ a[query], b @ b[query]
    assert float(fixed[0][f"AP@{k} single"]) == pytest.approx(reference_ap(sims_a, labels, query, k), abs=1e-5)
    assert float(fixed[0][f"AP@{k} ensemble"]) == pytest.approx(reference_ap(sims_a + sims_b, labels, query, k), abs=1e-5)

    show_list(page, "ensemble broke")
    broke = rows_of(grid_csv(page, "explorer:list:ensemble broke"))
    assert broke and all(float(r["change"]) < 0 for r in broke)
    show_list(page, "hardest")
    assert len(rows_of(grid_csv(page, "explorer:list:hardest"))) == 50
    show_list(page, "per class")
    per_class = page.locator("[data-testid=stExpander] [data-testid=stDataFrame]").first
    assert len(rows_of(grid_csv(page, per_class))) == CLASSES
    assert problems(page) == []


def test_the_map_draws_all_50000_points_with_webgl(scale_page, study):
    app, page = scale_page
    open_page(page, app, "Embedding map")
    assert problems(page) == []
    drawn = map_points(page, CLASSES * PER_CLASS)
    assert drawn == {"scattergl": CLASSES * PER_CLASS}
    title = page.locator(".st-key-map-chart .gtitle").text_content()
    assert title.startswith("PCA of") and "50,000 eval images" in title and "1,000 classes" in title
    assert problems(page) == []
