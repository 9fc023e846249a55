"""Full-page screenshots of every dashboard page for docs/screenshots/ (01-start.png, 02-data.png, ...).

    .venv/bin/python tests/e2e/take_screenshots.py                      # demo-small, prepared here once
    .venv/bin/python tests/e2e/take_screenshots.py --workspace workspace --dataset demo   # an existing workspace

Without --workspace it prepares the offline demo-small set with the CLI (as the browser tests do) in
test-artifacts/screenshot-workspace/ and reuses it on later runs. Uses the same start-up and page helpers as
the tests (e2e_harness); prints any page that shows an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2e_harness import (ARTIFACTS, PAGES, REPO, chromium, nav, new_page, open_page, prepare_workspace, problems,
                         screenshot, serve)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", help="an already prepared workspace (default: demo-small, prepared here)")
    p.add_argument("--dataset", default="demo-small", help="the dataset the pages show (?dataset=)")
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    p.add_argument("--no-worker", action="store_true", help="do not start a worker on the workspace")
    args = p.parse_args(argv)

    workspace = Path(args.workspace) if args.workspace else prepare_workspace(ARTIFACTS / "screenshot-workspace")
    out = Path(args.out)
    bad = 0
    with serve(workspace.resolve(), dataset=args.dataset, worker=not args.no_worker) as app, chromium() as browser:
        page = new_page(browser)
        open_page(page, app, "Start")
        for title, _, name in PAGES:
            if title != "Start":
                nav(page, title)
            for problem in problems(page):
                bad += 1
                print(f"{title}: {problem}", file=sys.stderr)
            print(screenshot(page, out / f"{name}.png"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
