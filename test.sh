#!/usr/bin/env bash
# Installs everything (Chromium included) and runs the whole test suite: unit, page (AppTest),
# real worker processes, and browser tests in Debian's Chromium (screenshots under test-artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --tests
.venv/bin/python -m pytest "$@"
